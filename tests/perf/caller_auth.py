"""Benchmark scenario: what caller authentication adds to a request (`bench.py --caller-auth`).

Two gateways side by side, the same but for CIGW_CALLER_AUTH: `plain` (none) and
`callers` (kubernetes, against a local service-account issuer over TLS). Both get the same
requests, each carrying the same projected-style bearer token (the plain gateway drops it),
at the fixed rate in alternating rounds; the figure is the median over rounds of
p50(callers) - p50(plain). The issue's target: at most 0.1 ms at 1000 req/s, which holds
because a verified token is cached by its SHA-256 until it expires (one RS256 check per
token, then a hash and a lookup per request).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import ssl
import statistics
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from aiohttp import web

from tests.perf import bench
from tests.servers.oidc import ServiceAccountIssuer

TARGET_ADDED_P50_MS = 0.1
CALLER = ("bench", "client")


@dataclass
class CallerAuthReport:
    """Per-round p50s of both gateways, in ms."""

    rate: float
    duration: float
    plain_p50: list[float] = field(default_factory=list)
    callers_p50: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def added_p50_ms(self) -> float:
        """Median over rounds of the p50 difference (paired by round: load drifts together)."""
        return statistics.median(
            c - p for c, p in zip(self.callers_p50, self.plain_p50, strict=True)
        )

    def markdown(self) -> str:
        """The figure as a small Markdown table."""
        rounds = ", ".join(
            f"{c - p:+.3f}" for c, p in zip(self.callers_p50, self.plain_p50, strict=True)
        )
        errors = self.errors.get("callers", 0)
        verdict = "met" if self.added_p50_ms <= TARGET_ADDED_P50_MS else "NOT met"
        return "\n".join(
            [
                f"| caller authentication at {self.rate:g} req/s | value |",
                "|---|---|",
                f"| p50 without (median of rounds), ms | {statistics.median(self.plain_p50):.3f} |",
                f"| p50 with (median of rounds), ms | {statistics.median(self.callers_p50):.3f} |",
                f"| added p50, ms (per round: {rounds}) | {self.added_p50_ms:+.3f} |",
                f"| target ≤ {TARGET_ADDED_P50_MS} ms | {verdict} |",
                f"| errors (plain / callers) | {self.errors.get('plain', 0)} / {errors} |",
                f"| rounds, seconds each | {len(self.plain_p50)}, {self.duration:g} |",
            ]
        )


@contextlib.asynccontextmanager
async def serving_sa_issuer(ca: trustme.CA) -> AsyncIterator[ServiceAccountIssuer]:
    """The service-account issuer (discovery + JWKS) over TLS, in this process."""
    issuer = ServiceAccountIssuer()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    runner = web.AppRunner(issuer.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    issuer.base_url = f"https://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield issuer
    finally:
        await runner.cleanup()


async def run(opts: bench.Options, say: Callable[[str], None]) -> CallerAuthReport:
    """Start the issuers, the upstream and both gateways; measure in alternating rounds."""
    workdir = opts.out / "caller-auth"
    workdir.mkdir(parents=True, exist_ok=True)
    certs = bench.Certificates.make(workdir)
    report = CallerAuthReport(opts.rate, opts.duration)
    async with contextlib.AsyncExitStack() as stack:
        token_issuer = await bench.spawn_python_server(
            stack, "issuer", str(certs.cert), str(certs.key), log=workdir / "issuer.log"
        )
        upstream = await bench.spawn_python_server(stack, "upstream", log=workdir / "up.log")
        ca = trustme.CA()
        ca_file = workdir / "sa-ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        sa_issuer = await stack.enter_async_context(serving_sa_issuer(ca))
        token = sa_issuer.token(*CALLER)  # an hour's lifetime: cached for the whole run
        targets: dict[str, bench.Service] = {}
        for name, extra in (
            ("plain", {}),
            (
                "callers",
                {
                    "CIGW_CALLER_AUTH": "kubernetes",
                    "CIGW_CALLER_ISSUER": sa_issuer.issuer,
                    "CIGW_CALLER_CA_FILE": str(ca_file),
                    "CIGW_CALLER_ALLOW": "/".join(CALLER),
                },
            ),
        ):
            env = bench.gateway_env(
                opts,
                issuer_port=token_issuer.port,
                upstream_port=upstream.port,
                listen=bench.free_port(),
                admin=bench.free_port(),
                ca=certs.ca,
            )
            env.update(extra)
            targets[name], seconds = await bench.start_gateway(
                stack, opts, env, workdir, name=f"gateway-{name}"
            )
            say(f"gateway {name} ready in {seconds:.2f} s")
        header = f"Authorization: Bearer {token}"
        for service in targets.values():  # warm-up: connections, the token cache
            await _open_loop(service.port, dataclasses.replace(opts, duration=opts.warmup), header)
        for number in range(opts.rounds):
            order = list(targets.items())
            if number % 2:
                order.reverse()
            for name, service in order:
                p50, errors = await _open_loop(service.port, opts, header)
                (report.plain_p50 if name == "plain" else report.callers_p50).append(p50)
                report.errors[name] = report.errors.get(name, 0) + errors
                say(f"round {number + 1}: {name} p50 {p50:.3f} ms, errors {errors}")
    return report


async def _open_loop(port: int, opts: bench.Options, header: str) -> tuple[float, int]:
    """p50 in ms and the error count of one fixed-rate run carrying `header`."""
    out = await bench.run_tool(
        sys.executable,
        "-m",
        "tests.perf.loadgen",
        "open",
        f"http://127.0.0.1:{port}/ping",
        f"--duration={opts.duration}",
        f"--rate={opts.rate}",
        f"--header={header}",
    )
    result = json.loads(out)
    latencies = sorted(value / 1000 for value in result["latencies_us"])
    return bench.percentile(latencies, 50.0), int(result["errors"])


def write(report: CallerAuthReport, out: Path) -> str:
    """The Markdown table, also written to out/caller-auth.md."""
    text = report.markdown()
    (out / "caller-auth.md").write_text(text + "\n")
    return text
