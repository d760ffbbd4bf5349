"""Routes and link rewriting: what a route lookup and a rewritten 1 MiB JSON answer cost.

    python -m tests.perf.bench --routes [--quick] [--duration S] [--rounds N] [--write-results]

Routing: two gateways against the same upstream, in alternating open-loop rounds at the
fixed rate: one configured from the environment (the implicit "/" route), one with four
YAML routes, asked through one of them (`/ci/ping`). The p50 difference is what routing
adds (target: at most 0.05 ms).

Rewriting: the rewriter's own time on a 1 MiB Dataverse-like page (5,000 records with an
`@odata.etag` each, the `@odata.nextLink` last) fed in 64 KiB reads, median of repetitions
in this process (target: under 2 ms); and end to end, one gateway with two routes to an
upstream serving that page, one rewriting and one not, at a low fixed rate: the p50
difference includes the chunked framing of the rewritten answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml
from aiohttp import web
from yarl import URL

from gateway.config import Route
from gateway.links import LinkRewriter
from gateway.ratelimit import ExchangeSlots, RetryBudget, UpstreamHold
from gateway.routing import Router, RouteState
from tests.perf import bench
from tests.perf.bench import Certificates, Options, Service, Target, Tools

TARGET_ROUTING_P50_MS = 0.05
TARGET_REWRITE_MS = 2.0
PAGE_RECORDS = 5000
READ = 64 * 1024
SINGLE_ROUTE = (
    "CIGW_UPSTREAM_URL",
    "CIGW_SCOPE",
    "CIGW_SUBSCRIPTION_KEY",
)


@dataclass
class RoutesReport:
    """What one routes run measured."""

    opts: Options
    started_at: str
    single: Target
    routed: Target
    plain: Target
    rewritten: Target
    rewrite_ms: list[float]
    page_bytes: int
    lookup_us: tuple[float, float] = (0.0, 0.0)  # (four routes, implicit route)
    wall_s: float = 0.0
    load: float = 0.0  # the 1-minute load average when the run ended

    @property
    def routing_added_ms(self) -> float:
        """p50 with four YAML routes minus p50 with the implicit route."""
        return self.routed.percentile(50) - self.single.percentile(50)

    @property
    def rewriting_added_ms(self) -> float:
        """p50 of the 1 MiB page through the rewriting route minus through the plain one."""
        return self.rewritten.percentile(50) - self.plain.percentile(50)


def page(origin: str) -> bytes:
    """About 1 MiB of a Dataverse accounts page whose links name `origin`."""
    base = f"{origin}/v1"
    records = [
        {
            "@odata.etag": f'W/"{1000000 + n}"',
            "accountid": f"{n:08x}-0000-4000-8000-000000000000",
            "name": f"Account {n}",
            "websiteurl": f"https://www.example.com/{n}",
            "description": "x" * 80,
        }
        for n in range(PAGE_RECORDS)
    ]
    document = {
        "@odata.context": f"{base}/$metadata#accounts",
        "value": records,
        "@odata.nextLink": f"{base}/accounts?$skiptoken=%3Ccookie%20pagenumber=%222%22/%3E",
    }
    return json.dumps(document).encode()


def lookup_cost() -> tuple[float, float]:
    """Microseconds per route lookup: (four routes via /ci/, the implicit "/" route)."""

    def router(*prefixes: str) -> Router:
        return Router(
            [
                RouteState(
                    Route(prefix, URL("http://127.0.0.1:1/v1"), bench.SCOPE),
                    tokens=None,  # type: ignore[arg-type]  # a lookup never touches them
                    keys=None,  # type: ignore[arg-type]
                    hold=UpstreamHold(),
                    budget=RetryBudget(),
                    slots=ExchangeSlots(1),
                )
                for prefix in prefixes
            ]
        )

    four = router("/dataverse/", "/ci/", "/ci/special/", "/")
    one = router("/")
    number = 200_000
    routed = min(timeit.repeat(lambda: four.match("/ci/ping"), number=number, repeat=5))
    single = min(timeit.repeat(lambda: one.match("/ping"), number=number, repeat=5))
    return routed / number * 1e6, single / number * 1e6


def rewrite_cost(repetitions: int) -> tuple[list[float], int]:
    """Milliseconds the rewriter takes over the 1 MiB page in 64 KiB reads, per repetition."""
    origin = "https://contoso.crm.dynamics.com"
    body = page(origin)
    links = LinkRewriter(URL(f"{origin}/v1"), "/dataverse/").for_answer("http", "127.0.0.1:8080")
    assert links is not None
    reads = [body[i : i + READ] for i in range(0, len(body), READ)]
    times = []
    for _ in range(repetitions):
        started = time.perf_counter()
        stream = links.json()
        out = [stream.feed(read) for read in reads]
        out.append(stream.end())
        times.append((time.perf_counter() - started) * 1000)
    rewritten = b"".join(out)
    assert b"http://127.0.0.1:8080/dataverse/accounts?$skiptoken" in rewritten
    return times, len(body)


# --------------------------------------------------------------------------- the page upstream


async def _serve_page() -> None:
    app = web.Application()
    body: dict[str, bytes] = {}

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=body["page"], content_type="application/json")

    app.router.add_get("/v1/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    body["page"] = page(f"http://127.0.0.1:{port}")
    print(f"port={port}", flush=True)  # noqa: T201 - read by the harness
    await asyncio.Event().wait()


async def spawn_page_upstream(stack: contextlib.AsyncExitStack, log: Path) -> Service:
    """The 1 MiB page server in its own process."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.perf.routes_bench",
        "serve-page",
        cwd=bench.REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=log.open("wb"),
    )
    service = Service("page-upstream", process, 0)
    stack.push_async_callback(service.stop)
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    if not line.startswith(b"port="):
        raise RuntimeError(f"the page upstream did not start; see {log}")
    service.port = int(line.split(b"=", 1)[1])
    return service


# --------------------------------------------------------------------------- the run


def routes_env(
    env: dict[str, str], config: Path, routes: list[dict[str, object]]
) -> dict[str, str]:
    """`env` with its single-route settings replaced by a YAML file of `routes`."""
    config.write_text(yaml.safe_dump({"routes": routes}))
    out = {name: value for name, value in env.items() if name not in SINGLE_ROUTE}
    out["CIGW_CONFIG"] = str(config)
    out["CIGW_LISTEN"] = f"127.0.0.1:{bench.free_port()}"
    out["CIGW_ADMIN_LISTEN"] = f"127.0.0.1:{bench.free_port()}"
    return out


async def run(opts: Options, say: Callable[[str], None]) -> RoutesReport:
    """Start issuer, upstreams and three gateways; measure; stop everything."""
    tools = Tools.find(opts.tools)
    workdir = opts.out / "routes-run"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    certs = Certificates.make(workdir)
    began = time.perf_counter()
    repetitions = 20 if opts.rounds <= 1 else 200
    rewrite_ms, page_bytes = rewrite_cost(repetitions)
    lookup = lookup_cost()
    say(f"route lookup: {lookup[0]:.3f} µs with four routes, {lookup[1]:.3f} µs with one")
    say(f"rewriter: median {statistics.median(rewrite_ms):.3f} ms per {page_bytes:,}-byte page")
    async with contextlib.AsyncExitStack() as stack:
        issuer = await bench.spawn_python_server(
            stack, "issuer", str(certs.cert), str(certs.key), log=workdir / "issuer.log"
        )
        upstream = await bench.spawn_python_server(stack, "upstream", log=workdir / "upstream.log")
        pages = await spawn_page_upstream(stack, workdir / "page-upstream.log")
        env = bench.gateway_env(
            opts,
            issuer_port=issuer.port,
            upstream_port=upstream.port,
            listen=bench.free_port(),
            admin=bench.free_port(),
            ca=certs.ca,
        )
        single, _ = await bench.start_gateway(stack, opts, env, workdir, name="single")
        other = f"http://127.0.0.1:{upstream.port}"
        four = routes_env(
            env,
            workdir / "four-routes.yaml",
            [
                {
                    "prefix": "/dataverse/",
                    "upstream_url": f"{other}/v1",
                    "scope": f"{other}/.default",
                },
                {
                    "prefix": "/ci/",
                    "upstream_url": f"{other}/v1",
                    "scope": bench.SCOPE,
                    "subscription_key": bench.SUBSCRIPTION_KEY,
                },
                {"prefix": "/ci/special/", "upstream_url": f"{other}/v1", "scope": bench.SCOPE},
                {"prefix": "/", "upstream_url": f"{other}/v1", "scope": bench.SCOPE},
            ],
        )
        routed, _ = await bench.start_gateway(stack, opts, four, workdir, name="routed")
        page_base = f"http://127.0.0.1:{pages.port}/v1"
        two = routes_env(
            env,
            workdir / "rewrite-routes.yaml",
            [
                {
                    "prefix": "/dv/",
                    "upstream_url": page_base,
                    "scope": bench.SCOPE,
                    "rewrite_links": True,
                },
                {"prefix": "/plain/", "upstream_url": page_base, "scope": bench.SCOPE},
            ],
        )
        rewriting, _ = await bench.start_gateway(stack, opts, two, workdir, name="rewriting")
        say("gateways ready: single route, four routes, rewriting")
        report = RoutesReport(
            opts,
            datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            Target("single", f"http://127.0.0.1:{single.port}/ping", single.pid),
            Target("routed", f"http://127.0.0.1:{routed.port}/ci/ping", routed.pid),
            Target("plain", f"http://127.0.0.1:{rewriting.port}/plain/accounts", rewriting.pid),
            Target("rewritten", f"http://127.0.0.1:{rewriting.port}/dv/accounts", rewriting.pid),
            rewrite_ms,
            page_bytes,
            lookup,
        )
        warm = dataclasses.replace(opts, duration=opts.warmup)
        for target in (report.single, report.routed):
            await bench.closed_loop(tools, warm, target.url)
        # 1 MiB answers at a rate the shared machine sustains without queueing.
        slow = dataclasses.replace(opts, rate=min(opts.rate, 50.0))
        for target in (report.plain, report.rewritten):
            await bench.open_loop(
                tools, dataclasses.replace(slow, duration=opts.warmup), target.url
            )
        for number in range(opts.rounds):
            pairs = ((report.single, report.routed), (report.plain, report.rewritten))
            for (first, second), pace in zip(pairs, (opts, slow), strict=True):
                order = (first, second) if number % 2 == 0 else (second, first)
                for target in order:
                    await bench.measure_latency(tools, pace, target)
            say(
                f"round {number + 1}: routing adds {report.routing_added_ms:+.3f} ms p50, "
                f"rewriting 1 MiB adds {report.rewriting_added_ms:+.3f} ms p50 (so far)"
            )
    report.wall_s = time.perf_counter() - began
    report.load = os.getloadavg()[0]
    return report


# --------------------------------------------------------------------------- the report


def markdown(report: RoutesReport) -> str:
    """The section for tests/perf/RESULTS.md."""
    opts = report.opts
    rewrite = statistics.median(report.rewrite_ms)
    routing = report.routing_added_ms

    def verdict(met: bool) -> str:
        return "met" if met else "**missed**"

    def row(target: Target) -> str:
        return (
            f"| {target.name} | {target.percentile(50):.3f} | {target.percentile(90):.3f} | "
            f"{target.percentile(99):.3f} | {min(target.achieved, default=0):,.0f} | "
            f"{target.errors} |"
        )

    return "\n".join(
        [
            "## Routes and link rewriting (`--routes`)",
            "",
            (
                f"Run {report.started_at}: {opts.rounds} alternating round(s) of "
                f"{opts.duration:g} s per target; {opts.rate:g} req/s for the routing pair, "
                f"{min(opts.rate, 50.0):g} req/s for the 1 MiB pair; {report.wall_s:.0f} s in all. "
                "The machine's 2 CPUs were shared with other work (noisy; load average "
                f"{report.load:.1f} at the end): differences of a few hundredths of a "
                "millisecond are within the noise of one run."
            ),
            "",
            "| target | p50 ms | p90 ms | p99 ms | lowest achieved req/s | failed |",
            "|---|---:|---:|---:|---:|---:|",
            row(report.single),
            row(report.routed),
            row(report.plain),
            row(report.rewritten),
            "",
            (
                "single: routes from the environment (the implicit `/` route); routed: four YAML "
                "routes, asked through `/ci/`; plain and rewritten: a 1 MiB JSON page through a "
                "route without and with `rewrite_links`. The end-to-end routing figure compares "
                "two processes: when the machine is loaded their p50s drift apart by more than "
                "a route lookup costs, so the lookup row measures that work directly "
                "(timeit, best of 5 x 200,000 lookups)."
            ),
            "",
            "| figure | measured | target | |",
            "|---|---:|---:|---|",
            (
                f"| routing added, p50 (routed - single), ms | {routing:+.3f} | <= "
                f"{TARGET_ROUTING_P50_MS} | {verdict(routing <= TARGET_ROUTING_P50_MS)} |"
            ),
            (
                "| route lookup, four routes (implicit route), µs per request | "
                f"{report.lookup_us[0]:.3f} ({report.lookup_us[1]:.3f}) | <= 50 | "
                f"{verdict(report.lookup_us[0] <= TARGET_ROUTING_P50_MS * 1000)} |"
            ),
            (
                f"| rewriter on a {report.page_bytes / 1024 / 1024:.2f} MiB page in 64 KiB reads, "
                f"median (fastest) of {len(report.rewrite_ms)}, ms | {rewrite:.3f} "
                f"({min(report.rewrite_ms):.3f}) | < {TARGET_REWRITE_MS} | "
                f"{verdict(rewrite < TARGET_REWRITE_MS)} |"
            ),
            (
                f"| rewriting added end to end, p50 (rewritten - plain), ms | "
                f"{report.rewriting_added_ms:+.3f} |  |  |"
            ),
            "",
        ]
    )


def write(report: RoutesReport, opts: Options) -> str:
    """Write the section to out/ (and, with --write-results, into tests/perf/RESULTS.md)."""
    text = markdown(report)
    (opts.out / "ROUTES.md").write_text(text)
    summary = {
        "routing_added_p50_ms": report.routing_added_ms,
        "rewrite_ms_median": statistics.median(report.rewrite_ms),
        "rewriting_added_p50_ms": report.rewriting_added_ms,
        "errors": sum(
            t.errors for t in (report.single, report.routed, report.plain, report.rewritten)
        ),
    }
    (opts.out / "routes.json").write_text(json.dumps(summary, indent=2))
    if opts.write_results:
        results = bench.HERE / "RESULTS.md"
        current = results.read_text()
        marker = "## Routes and link rewriting"
        if marker in current:  # replace this section only, keep any that follow it
            before, _, rest = current.partition(marker)
            after = rest[rest.find("\n## ") :] if "\n## " in rest else ""
            results.write_text(before + text.rstrip() + "\n" + after)
        else:
            results.write_text(current.rstrip() + "\n\n" + text)
    return text


def main(opts: Options, say: Callable[[str], None]) -> int:
    """Run the routes scenario and print its section."""
    opts.out.mkdir(parents=True, exist_ok=True)
    try:
        import uvloop
    except ImportError:
        report = asyncio.run(run(opts, say))
    else:
        report = uvloop.run(run(opts, say))
    print(write(report, opts))  # noqa: T201
    return 0


def _server_main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.perf.routes_bench")
    parser.add_argument("role", choices=("serve-page",))
    parser.parse_args(argv)
    asyncio.run(_serve_page())


if __name__ == "__main__":
    _server_main()
