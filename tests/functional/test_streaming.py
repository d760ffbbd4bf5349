"""Bodies stream both ways: byte-exact by SHA-256, with flat memory in the gateway process."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.process import GatewayProcess, spawn_gateway
from tests.servers.upstream import Upstream, pattern, pattern_sha256

MIB = 1024 * 1024
# Generous against allocator noise, tiny against the sizes moved: a buffered body would
# grow RSS by the body's size (64 or 256 MiB).
MAX_RSS_GROWTH = 24 * MIB


@pytest.fixture
async def child(gateway_env: dict[str, str], tmp_path: Path) -> AsyncIterator[GatewayProcess]:
    """A gateway process (its memory can be read from /proc), ready to serve."""
    process = await spawn_gateway(gateway_env, tmp_path / "gateway.log")
    await process.wait_ready()
    yield process
    await process.stop()


class PeakRss:
    """Samples a process's RSS in the background while a transfer runs."""

    def __init__(self, process: GatewayProcess) -> None:
        self.process, self.baseline, self.peak = process, process.rss_bytes(), 0
        self._task = asyncio.ensure_future(self._sample())

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.process.rss_bytes())
            await asyncio.sleep(0.02)

    async def growth(self) -> int:
        """Peak RSS minus the RSS before the transfer."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.peak = max(self.peak, self.process.rss_bytes())
        return self.peak - self.baseline


async def _body(size: int) -> AsyncIterator[bytes]:
    for piece in pattern(size):
        yield piece


async def _warm_up(session: aiohttp.ClientSession, process: GatewayProcess) -> None:
    # Let allocator pools and connection buffers reach their working size first.
    async with session.post(process.url("/upload"), data=_body(4 * MIB)) as response:
        assert response.status == 200
    async with session.get(process.url(f"/download?size={4 * MIB}")) as response:
        await response.read()


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "chunked"])
async def test_64_mib_upload_streams_byte_exact(
    child: GatewayProcess, upstream: Upstream, with_length: bool
) -> None:
    """A 64 MiB upload reaches the upstream with the same SHA-256, without being buffered."""
    size = 64 * MIB
    async with aiohttp.ClientSession() as session:
        await _warm_up(session, child)
        rss = PeakRss(child)
        headers = {"Content-Length": str(size)} if with_length else {}
        async with session.put(child.url("/upload"), data=_body(size), headers=headers) as response:
            assert response.status == 200
            result = await response.json()
        growth = await rss.growth()
    assert result == {"sha256": pattern_sha256(size), "length": size}
    assert growth < MAX_RSS_GROWTH, f"RSS grew {growth / MIB:.1f} MiB"


async def test_256_mib_download_streams_byte_exact(child: GatewayProcess) -> None:
    """A 256 MiB download arrives with the same SHA-256, without being buffered."""
    size = 256 * MIB
    digest, received = hashlib.sha256(), 0
    async with aiohttp.ClientSession() as session:
        await _warm_up(session, child)
        rss = PeakRss(child)
        async with session.get(child.url(f"/download?size={size}&length=1")) as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(size)
            async for chunk in response.content.iter_chunked(256 * 1024):
                digest.update(chunk)
                received += len(chunk)
        growth = await rss.growth()
    assert received == size
    assert digest.hexdigest() == pattern_sha256(size)
    assert growth < MAX_RSS_GROWTH, f"RSS grew {growth / MIB:.1f} MiB"
