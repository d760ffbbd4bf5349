"""One /metrics for a process group: with CIGW_WORKERS=N a scrape reports every worker.

The kernel hands a scrape to any one worker (SO_REUSEPORT), which used to answer with its
own numbers only. Each worker now also serves its own registry on a Unix socket in a
directory the first process made before forking (`worker-<index>.sock`); the worker that
is scraped reads the others' pages, adds them to its own and answers once. Metric names
and labels are unchanged: counters and histograms are summed, gauges aggregated as
`GAUGE_AGGREGATION` says.

Why not prometheus-client's multiprocess mode: it keeps each value in a memory-mapped file
(slower on the request path than `RequestTally`'s plain numbers, tests/perf/README.md)
and supports neither custom collectors nor callback gauges, which the gateway has.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gateway.logging import get_logger

log = get_logger("metrics")

PEER_TIMEOUT = 2.0  # seconds to wait for another worker's page before leaving it out
# Every gauge the gateway exports, with how the workers' values combine (default: sum).
GAUGE_AGGREGATION: dict[str, Callable[[list[float]], float]] = {
    "cigw_inflight_requests": sum,
    "cigw_ready": min,  # ready only when every worker is
    "cigw_token_expiry_timestamp_seconds": min,  # the soonest expiry
    "cigw_subscription_key_active": max,
    "cigw_upstream_hold_seconds": max,
    "cigw_build_info": max,
    "cigw_fleet_members": max,
    "cigw_fleet_redis_up": min,  # up only when every worker reaches Redis
    "cigw_fleet_fallback_active": max,
}


@dataclass(frozen=True, slots=True)
class WorkerGroup:
    """This process's place in a CIGW_WORKERS group: the shared directory, its index, the size."""

    directory: Path
    index: int
    workers: int

    @property
    def own_socket(self) -> Path:
        """Where this worker serves its own page."""
        return socket_path(self.directory, self.index)


def socket_path(directory: Path, index: int) -> Path:
    """Where worker `index` (0: the first process) serves its own page."""
    return directory / f"worker-{index}.sock"


class _Merged(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def merge(pages: list[str]) -> bytes:
    """The text exposition of several workers' pages, combined into one."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    for page in pages:
        for family in text_string_to_metric_families(page):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                samples.setdefault(key, []).append(sample.value)
    for name, family in families.items():
        combine = _aggregation(name, family.type)
        for (sample_name, labels), numbers in values[name].items():
            family.add_sample(sample_name, dict(labels), combine(numbers))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(families.values())))
    return generate_latest(registry)


def _aggregation(name: str, kind: str) -> Callable[[list[float]], float]:
    if name.endswith("_created"):
        return min  # the series exists since the first worker made it
    if kind == "gauge":
        return GAUGE_AGGREGATION.get(name, sum)
    return sum


async def scrape_group(own: bytes, group: WorkerGroup) -> bytes:
    """This worker's page plus every other worker's, merged."""
    others = [
        socket_path(group.directory, peer) for peer in range(group.workers) if peer != group.index
    ]
    pages = await asyncio.gather(*(_read_peer(path) for path in others))
    return merge([own.decode(), *(page for page in pages if page is not None)])


async def _read_peer(path: Path) -> str | None:
    connector = aiohttp.UnixConnector(path=str(path))
    try:
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(
                "http://worker/metrics", timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT)
            ) as response,
        ):
            return await response.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        # A worker still starting or already stopping; the page says so by its sums.
        log.warning("worker_metrics_unavailable", worker=path.name, error=type(exc).__name__)
        return None


@contextlib.asynccontextmanager
async def serve_own(registry: CollectorRegistry, path: Path) -> AsyncIterator[None]:
    """Serve this worker's own page on the Unix socket `path` while in use."""

    async def page(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry))

    app = web.Application()
    app.router.add_get("/metrics", page)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    try:
        yield
    finally:
        await runner.cleanup()
