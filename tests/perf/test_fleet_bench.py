"""The fleet benchmark's arithmetic and options (its run is `make bench BENCH_ARGS=--fleet`)."""

from __future__ import annotations

from tests.perf.fleet import FleetOptions, markdown, parse, windows


def test_windows_count_arrivals_in_each_sliding_ten_seconds() -> None:
    """Each 10 s window, sliding by 0.5 s, counts the arrivals inside it."""
    arrived = [100.0 + i * 0.1 for i in range(120)]  # 10 per second for 12 s
    counts = windows(arrived, 100.0, 12.0)
    assert len(counts) == 5
    assert all(99 <= count <= 101 for count in counts)


def test_quick_options_keep_one_full_window_and_the_issue_bounds_print() -> None:
    """--quick still measures a whole 10 s window; the table names each bound and verdict."""
    opts = parse(["--quick"])
    assert opts.budget_seconds >= 10
    figures = dict.fromkeys(
        (
            "budget_max_ratio",
            "budget_max_ratio_less_burst",
            "budget_min_ratio",
            "calls_per_admitted",
            "latency_calls_per_request",
            "added_p50_ms",
            "added_p99_ms",
            "latency_fleet_p50_ms",
            "latency_local_p50_ms",
            "latency_fleet_p99_ms",
            "latency_local_p99_ms",
            "hold_p99_ms",
            "hold_p50_ms",
            "budget_5xx",
            "outage_5xx",
            "outage_admitted_ratio",
            "outage_back_s",
        ),
        0.0,
    )
    table = markdown(FleetOptions(), figures)
    assert "<= 1.05" in table
    assert "<= 100 ms" in table
    assert "NOT met" in table  # the quietest window at 0 is below 0.95
