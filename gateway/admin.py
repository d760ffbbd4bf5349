"""The admin listener: /metrics, /healthz, /readyz; never behind the proxy's middlewares."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.group_metrics import scrape_group
from gateway.state import METRICS, READINESS, WORKER_GROUP


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of the gateway's registry (of every worker's, summed)."""
    body = generate_latest(request.app[METRICS].registry)
    group = request.app.get(WORKER_GROUP)
    if group is not None:
        body = await scrape_group(body, group)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(_request: web.Request) -> web.Response:
    """200 while the process serves: liveness, not readiness."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 only with a valid token and not draining; otherwise 503 with the reason."""
    reason = request.app[READINESS].reason()
    if reason is None:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready", "reason": reason}, status=503)


def routes() -> list[web.RouteDef]:
    """The admin routes."""
    return [
        web.get("/metrics", metrics),
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
    ]
