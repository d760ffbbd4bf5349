"""The benchmark harness in its tiny mode, so `make bench` cannot rot (no thresholds here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "tools",
    [
        # What a fresh machine runs: aiohttp upstream, Python load loops, no nginx reference.
        pytest.param("python", id="fallbacks"),
        # nginx, wrk and hey where installed (the same as the fallbacks where not).
        pytest.param("auto", id="installed-tools"),
    ],
)
def test_quick_bench_reports_every_figure(tools: str, tmp_path: Path) -> None:
    """A --quick run starts issuer, upstream and gateway, measures, and writes table and plot."""
    run = subprocess.run(
        [sys.executable, "-m", "tests.perf.bench", "--quick", "--tools", tools, "--out", tmp_path],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "| max throughput, req/s" in run.stdout
    assert "gateway/direct" in run.stdout
    assert (tmp_path / "latency.png").stat().st_size > 10_000
    figures = json.loads((tmp_path / "results.json").read_text())
    gateway = figures["targets"]["gateway"]
    assert gateway["errors"] == 0
    assert gateway["p99_ms"] > 0
    assert gateway["cpu_per_1000"] > 0
    assert figures["token_calls_load"] == 0
    # The libraries alone are measured in a process of their own: less than the gateway.
    assert 0 < figures["libraries_rss"] < figures["gateway_rss_idle"]
    assert [stream["direction"] for stream in figures["streams"]] == ["upload", "download"]


def test_quick_routes_bench_reports_its_figures(tmp_path: Path) -> None:
    """--routes --quick measures routing and rewriting and writes its section and figures."""
    run = subprocess.run(
        [sys.executable, "-m", "tests.perf.bench", "--routes", "--quick", "--out", tmp_path],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "| routing added, p50 (routed - single), ms |" in run.stdout
    figures = json.loads((tmp_path / "routes.json").read_text())
    assert figures["errors"] == 0
    assert figures["rewrite_ms_median"] > 0


def test_quick_caller_auth_scenario_reports_the_added_p50(tmp_path: Path) -> None:
    """`--caller-auth --quick` starts both gateways and the issuers and reports the figure."""
    run = subprocess.run(
        [sys.executable, "-m", "tests.perf.bench", "--caller-auth", "--quick", "--out", tmp_path],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "| added p50, ms" in run.stdout
    assert "| errors (plain / callers) | 0 / 0 |" in run.stdout
    assert (tmp_path / "caller-auth.md").read_text().strip() == run.stdout.strip()
