"""A bounded fuzz of raw requests against a gateway process on each aiohttp parser.

Mutated requests (inserted CR/LF/NUL, framing headers, dot-segments, duplicated or
swapped lines, credentials) must each end in an answer that is not a 500, or a closed
connection, in bounded time; everything reaching the upstream must be clean. The budget
is CIGW_FUZZ_SECONDS in total (default 10, shared by the three runs: each parser on plain
HTTP, and the C parser behind the HTTPS listener); CIGW_FUZZ_SEED
replays a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time

import pytest

from tests.conftest import CANARY_PRIMARY, CANARY_SECONDARY
from tests.security.support import (
    ConnectionClosedError,
    GatewayProcess,
    Ledger,
    SecurityUpstream,
    key_name,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

BUDGET = float(os.environ.get("CIGW_FUZZ_SECONDS", "10")) / 3  # per run
SEED = int(os.environ.get("CIGW_FUZZ_SEED", str(random.SystemRandom().randrange(2**32))))
WORKERS = 8

TEMPLATES = [
    b"GET /echo/fuzz?a=1 HTTP/1.1\r\nHost: gateway\r\nAccept: */*\r\n\r\n",
    b"POST /echo/fuzz HTTP/1.1\r\nHost: gateway\r\nContent-Length: 5\r\n\r\nhello",
    (
        b"POST /echo/fuzz HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    ),
    (
        b"PUT /echo/fuzz/item HTTP/1.1\r\nHost: gateway\r\nConnection: keep-alive\r\n"
        b"X-Request-ID: abc\r\nContent-Length: 2\r\n\r\n{}"
    ),
    b"GET /echo/a HTTP/1.1\r\nHost: gateway\r\n\r\nGET /echo/b HTTP/1.1\r\nHost: gateway\r\n\r\n",
]
TOKENS = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b" ",
    b"\t",
    b"\x0b",
    b":",
    b",",
    b";",
    b"\xff",
    b"\x7f",
    b"chunked",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked, identity\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: -1\r\n",
    b"Content-Length: 99999\r\n",
    b"Host: evil.example\r\n",
    b"X-Forwarded-Host: evil\r\n",
    b"..",
    b"%2e%2e",
    b"%2f",
    b"\\",
    b"..;",
    b"//",
    b"0\r\n\r\n",
    b"ffffffff\r\n",
    b"GET /echo/smuggled HTTP/1.1\r\n\r\n",
    b"Connection: close, Authorization, Ocp-Apim-Subscription-Key\r\n",
    b"Authorization: Bearer caller\r\n",
    b"Ocp-Apim-Subscription-Key: caller\r\n",
    b"?subscription-key=caller",
    b"Upgrade: websocket\r\nConnection: upgrade\r\n",
    b"Expect: 100-continue\r\n",
    b"HTTP/1.0",
    b"HTTP/2.0",
    b"CONNECT",
    b"http://evil/",
    b"a" * 300,
    b"%",
    b"%00",
    b"\xc0\xae",
    b"#",
    b"?",
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to four random edits of `data`."""
    for _ in range(rng.randint(1, 4)):
        position = rng.randrange(len(data) + 1)
        operation = rng.randrange(6)
        if operation == 0:
            data = data[:position] + rng.choice(TOKENS) + data[position:]
        elif operation == 1:
            data = data[:position] + data[position + rng.randint(1, 8) :]
        elif operation == 2 and data:
            index = rng.randrange(len(data))
            data = data[:index] + bytes([rng.randrange(256)]) + data[index + 1 :]
        elif operation == 3:
            lines = data.split(b"\r\n")
            index = rng.randrange(len(lines))
            lines.insert(index, lines[index])
            data = b"\r\n".join(lines)
        elif operation == 4:
            lines = data.split(b"\r\n")
            first, second = rng.randrange(len(lines)), rng.randrange(len(lines))
            lines[first], lines[second] = lines[second], lines[first]
            data = b"\r\n".join(lines)
        else:
            end = min(len(data), position + rng.randint(1, 12))
            data = data[:position] + data[position:end].swapcase() + data[end:]
    return data


async def attempt(gateway: GatewayProcess, data: bytes, ledger: Ledger) -> list[int]:
    """Send `data`; the statuses answered before the connection closed or went quiet."""
    client = await gateway.connect(ledger)
    statuses: list[int] = []
    try:
        await client.send(data)
        with contextlib.suppress(ConnectionClosedError):
            # Up to as many answers as requests were sent (two templates pipeline).
            for _ in range(max(1, data.count(b" HTTP/1."))):
                response = await client.response(within=6)
                statuses.append(response.status)
                if response.closes:
                    break
    finally:
        await client.close()
    return statuses


async def test_fuzzed_requests_never_break_the_gateway(
    gateway_proc: GatewayProcess, shared_upstream: SecurityUpstream, ledger: Ledger
) -> None:
    """Mutated raw requests: never a 500 or a hang, only clean requests upstream, process alive."""
    run = f"{gateway_proc.listening['http_parser']}{'-tls' if gateway_proc.client_tls else ''}"
    rng = random.Random(f"{SEED}-{run}")  # noqa: S311 - replayable
    deadline = time.monotonic() + BUDGET
    arrivals_before = len(shared_upstream.arrivals)
    seen_before = len(shared_upstream.seen)
    sent = 0
    failures: list[str] = []

    async def worker() -> None:
        nonlocal sent
        while time.monotonic() < deadline and not failures:
            data = mutate(rng, rng.choice(TEMPLATES))
            sent += 1
            try:
                statuses = await attempt(gateway_proc, data, ledger)
            except TimeoutError:
                failures.append(f"no answer and no close for {data[:300]!r}")
                continue
            if any(status >= 500 and status not in (502, 504) for status in statuses):
                failures.append(f"{statuses} for {data[:300]!r}")

    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    assert not failures, f"CIGW_FUZZ_SEED={SEED}: {failures[0]}"
    assert sent > 20, "the budget should allow a useful number of requests"
    assert gateway_proc.process.returncode is None, "the gateway process died"
    assert gateway_proc.logged("unhandled_error") == []
    for method, raw_path, key in shared_upstream.arrivals[arrivals_before:]:
        assert raw_path.startswith("/v1/"), (method, raw_path)
        assert key in (CANARY_PRIMARY, CANARY_SECONDARY)
        query = raw_path.partition("?")[2]
        names = [key_name(piece) for part in query.split("&") for piece in part.split(";")]
        assert "subscription-key" not in names, raw_path
    for seen in shared_upstream.seen[seen_before:]:
        assert len(seen.header_values("Authorization")) == 1
        assert seen.header_values("Ocp-Apim-Subscription-Key") == [CANARY_PRIMARY]
        assert "smuggled" not in seen.raw_path
