"""A small HTTP/1.1 load generator: the fallback for wrk and hey, and a µs-resolution open loop.

  python -m tests.perf.loadgen closed URL --duration S --connections C
  python -m tests.perf.loadgen open URL --duration S --rate R

`closed` keeps C keep-alive connections busy (like wrk); `open` sends on a fixed schedule
whatever the answers do (a constant-rate, open-loop generator), opening another connection
when every open one is waiting, so a slow answer never delays the next request. Latency is
measured from the moment a request is written to the moment its answer is complete; how late
the generator itself was against its schedule is reported separately. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

_MAX_CONNECTIONS = 512


@dataclass
class Tally:
    """What one run observed."""

    ok: int = 0
    errors: int = 0
    latencies_us: list[int] = field(default_factory=list)
    lateness_us: list[int] = field(default_factory=list)


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, tally: Tally, on_idle: Callable[[_Connection], None]) -> None:
        self._tally, self._on_idle = tally, on_idle
        self._buffer = bytearray()
        self._sent_ns = 0
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.busy = True
        self._sent_ns = time.perf_counter_ns()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self.busy:
            end = _complete(self._buffer)
            if end is None:
                return
            status = int(self._buffer[9:12])
            del self._buffer[:end]
            self.busy = False
            if 200 <= status < 400:
                self._tally.ok += 1
                self._tally.latencies_us.append((time.perf_counter_ns() - self._sent_ns) // 1000)
            else:
                self._tally.errors += 1
            self._on_idle(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.busy:
            self.busy = False
            self._tally.errors += 1


def _complete(buffer: bytearray) -> int | None:
    """Length of the first complete response in `buffer` (Content-Length or chunked)."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = bytes(buffer[:head_end]).lower()
    start = head_end + 4
    marker = head.find(b"\r\ncontent-length:")
    if marker >= 0:
        value_end = head.find(b"\r\n", marker + 2)
        length = int(head[marker + 17 : value_end if value_end >= 0 else len(head)])
        return start + length if len(buffer) >= start + length else None
    if b"\r\ntransfer-encoding: chunked" in head:
        position = start
        while True:
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                return None
            size = int(bytes(buffer[position:line_end]).split(b";")[0], 16)
            position = line_end + 2 + size + 2
            if len(buffer) < position:
                return None
            if size == 0:
                return position
    return start  # no body (204, 304, or a bodiless error)


# Extra request header lines ("Name: value"), from --header (e.g. a caller's bearer token).
_EXTRA_HEADERS: list[str] = []


def _request(url: str) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    extra = "".join(f"{line}\r\n" for line in _EXTRA_HEADERS)
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: cigw-bench\r\n{extra}\r\n"
    )
    return host, port, request.encode()


async def closed_loop(url: str, duration: float, connections: int) -> dict[str, object]:
    """Keep `connections` requests in flight for `duration` seconds; count answers."""
    loop = asyncio.get_running_loop()
    host, port, request = _request(url)
    tally = Tally()
    stopping = False

    def again(connection: _Connection) -> None:
        if not stopping:
            connection.send(request)

    opened = [
        (await loop.create_connection(lambda: _Connection(tally, again), host, port))[1]
        for _ in range(connections)
    ]
    started = time.perf_counter()
    for connection in opened:
        connection.send(request)
    await asyncio.sleep(duration)
    stopping = True
    elapsed = time.perf_counter() - started
    for connection in opened:
        if connection.transport is not None:
            connection.transport.close()
    return {"ok": tally.ok, "errors": tally.errors, "seconds": elapsed}


async def open_loop(url: str, duration: float, rate: float) -> dict[str, object]:
    """Send `rate` requests per second on a fixed schedule for `duration` seconds."""
    loop = asyncio.get_running_loop()
    host, port, request = _request(url)
    tally = Tally()
    idle: list[_Connection] = []
    pool: list[_Connection] = []

    def on_idle(connection: _Connection) -> None:
        idle.append(connection)

    async def connect() -> _Connection:
        connection = (
            await loop.create_connection(lambda: _Connection(tally, on_idle), host, port)
        )[1]
        pool.append(connection)
        return connection

    for _ in range(8):  # a few warm connections; more are opened when all are busy
        idle.append(await connect())
    interval_ns = int(1e9 / rate)
    total = int(duration * rate)
    started_ns = time.perf_counter_ns()
    for index in range(total):
        due_ns = started_ns + index * interval_ns
        wait_ns = due_ns - time.perf_counter_ns()
        if wait_ns > 0:
            await asyncio.sleep(wait_ns / 1e9)
        connection = None
        while idle:
            candidate = idle.pop()
            if not candidate.closed:
                connection = candidate
                break
        if connection is None:
            if len(pool) >= _MAX_CONNECTIONS:
                tally.errors += 1  # the target is too slow to keep up; count, do not queue
                continue
            connection = await connect()
        tally.lateness_us.append(max(0, time.perf_counter_ns() - due_ns) // 1000)
        connection.send(request)
    # The schedule's length, or longer if the generator fell behind it.
    elapsed = max(duration, (time.perf_counter_ns() - started_ns) / 1e9)
    for _ in range(200):  # let the last answers arrive
        if not any(connection.busy for connection in pool):
            break
        await asyncio.sleep(0.01)
    for connection in pool:
        if connection.transport is not None:
            connection.transport.close()
    return {
        "ok": tally.ok,
        "errors": tally.errors,
        "seconds": elapsed,
        "connections": len(pool),
        "latencies_us": tally.latencies_us,
        "lateness_us": tally.lateness_us,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Run one load and print the result as JSON."""
    parser = argparse.ArgumentParser(prog="python -m tests.perf.loadgen")
    parser.add_argument("mode", choices=("closed", "open"))
    parser.add_argument("url")
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--header", action="append", default=[], help="'Name: value' to send")
    args = parser.parse_args(argv)
    _EXTRA_HEADERS[:] = args.header
    run = (
        closed_loop(args.url, args.duration, args.connections)
        if args.mode == "closed"
        else open_loop(args.url, args.duration, args.rate)
    )
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run)
    else:
        result = uvloop.run(run)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
