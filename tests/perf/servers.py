"""Servers the benchmark runs in their own processes, so they do not share the harness's CPU.

  python -m tests.perf.servers issuer CERT KEY   the TLS token issuer (gateway.sandbox), plus
                                                 GET /_bench/stats with its call counters
  python -m tests.perf.servers upstream          the fallback upstream when nginx is missing,
                                                 and the bulk source/sink for streaming runs

Each binds an ephemeral port on 127.0.0.1 and prints `port=N` as its first line.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
from collections.abc import Sequence

from aiohttp import web

from gateway.sandbox.issuer import ClientRegistration, TokenIssuer

# A Customer-Insights-shaped answer; no '$' (nginx would read it as a variable).
SMALL_BODY = (
    b'{"value":[{"instanceId":"7d3c0b2e-0000-4000-8000-000000000001",'
    b'"name":"bench","state":"Active","region":"westeurope"}],"count":1}'
)
TENANT = "72f988bf-0000-4000-8000-00000000be4c"
CLIENT = "5b1f8f1c-0000-4000-8000-00000000be4c"
CLIENT_SECRET = "bench-client-secret-not-a-secret"
_CHUNK = 256 * 1024
_ZEROS = bytes(_CHUNK)


def issuer_app(cert: str, key: str) -> tuple[web.Application, ssl.SSLContext, TokenIssuer]:
    """The sandbox token issuer with a stats route; returns the app, its TLS context, state."""
    issuer = TokenIssuer(ClientRegistration(TENANT, CLIENT, client_secret=CLIENT_SECRET))
    app = issuer.app()

    async def stats(_request: web.Request) -> web.Response:
        return web.json_response(
            {"token_calls": issuer.token_calls, "discovery_calls": issuer.discovery_calls}
        )

    app.router.add_get("/_bench/stats", stats)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return app, context, issuer


def upstream_app() -> web.Application:
    """/v1/bulk/upload (sink), /v1/bulk/download?bytes=N (source), anything else under /v1."""

    async def small(_request: web.Request) -> web.Response:
        return web.Response(body=SMALL_BODY, content_type="application/json")

    async def upload(request: web.Request) -> web.Response:
        received = 0
        while chunk := await request.content.readany():
            received += len(chunk)
        return web.json_response({"received": received})

    async def download(request: web.Request) -> web.StreamResponse:
        left = int(request.query.get("bytes", "0"))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = left
        await response.prepare(request)
        view = memoryview(_ZEROS)
        while left > 0:
            piece = view[: min(_CHUNK, left)]
            await response.write(piece)
            left -= len(piece)
        await response.write_eof()
        return response

    app = web.Application(client_max_size=2**62)
    app.router.add_post("/v1/bulk/upload", upload)
    app.router.add_get("/v1/bulk/download", download)
    app.router.add_route("*", "/v1/{tail:.*}", small)
    return app


async def _serve(app: web.Application, context: ssl.SSLContext | None) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=300)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context, backlog=1024).start()
    print(f"port={runner.addresses[0][1]}", flush=True)  # noqa: T201 - the parent reads it
    return runner


async def _main(args: argparse.Namespace) -> None:
    if args.role == "issuer":
        app, context, issuer = issuer_app(args.cert, args.key)
        runner = await _serve(app, context)
        issuer.base_url = f"https://127.0.0.1:{runner.addresses[0][1]}"
    else:
        await _serve(upstream_app(), None)
    await asyncio.Event().wait()  # until the harness terminates the process


def main(argv: Sequence[str] | None = None) -> None:
    """Run one server until terminated."""
    parser = argparse.ArgumentParser(prog="python -m tests.perf.servers")
    parser.add_argument("role", choices=("issuer", "upstream"))
    parser.add_argument("cert", nargs="?", default="")
    parser.add_argument("key", nargs="?", default="")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_main(args))
    else:
        uvloop.run(_main(args))


if __name__ == "__main__":
    main()
