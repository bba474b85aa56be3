"""The admin listener: metrics, health, readiness and the context-token keys."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler


def admin_app(
    registry: CollectorRegistry,
    is_ready: Callable[[], bool],
    jwks: Callable[[], dict[str, Any]],
) -> web.Application:
    """Probes need no token (Kubernetes sends none); nothing here reveals a secret."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        if is_ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    async def jwks_json(_: web.Request) -> web.Response:
        return web.json_response(jwks(), headers={"Cache-Control": "max-age=60"})

    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/.well-known/jwks.json", jwks_json)
    return app
