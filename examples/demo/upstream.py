"""A small HR API to stand behind the demo proxy.

It checks the API key the proxy injects and verifies the signed context the proxy forwards
(`X-Agentproxy-Context`) against the proxy's published keys, then shows what it was told.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import jwt
from aiohttp import web

API_KEY_FILE = "upstream-api-key.txt"
EMPLOYEES = {
    "1": {"id": "1", "name": "Ada (CEO)", "manager": None, "title": "CEO", "salary": 900_000},
    "42": {"id": "42", "name": "Grace", "manager": "alice", "title": "Engineer", "salary": 150_000},
    "43": {"id": "43", "name": "Linus", "manager": "alice", "title": "Engineer", "salary": 140_000},
    "44": {"id": "44", "name": "Barbara", "manager": "bob", "title": "Analyst", "salary": 120_000},
    "alice": {
        "id": "alice",
        "name": "Alice",
        "manager": "1",
        "title": "Director",
        "salary": 200_000,
    },
}


def make_app(api_key: str, jwks_url: str) -> web.Application:
    jwks = jwt.PyJWKClient(jwks_url, cache_jwk_set=True, lifespan=60)

    async def context(request: web.Request) -> dict[str, object]:
        token = request.headers.get("X-Agentproxy-Context", "")
        try:
            # PyJWKClient fetches with blocking urllib: keep it off the event loop.
            key = await asyncio.to_thread(jwks.get_signing_key_from_jwt, token)
            claims = jwt.decode(token, key, algorithms=["EdDSA", "ES256"], audience="tools")
        except jwt.PyJWTError as exc:
            return {"verified": False, "error": str(exc)}
        return {"verified": True, "claims": claims}

    @web.middleware
    async def require_key(request: web.Request, handler):  # type: ignore[no-untyped-def]
        if request.headers.get("X-Api-Key") != api_key:
            return web.json_response({"error": "missing or wrong API key"}, status=401)
        return await handler(request)

    async def get_employee(request: web.Request) -> web.Response:
        employee = EMPLOYEES.get(request.match_info["id"])
        if employee is None:
            return web.json_response({"error": "no such employee"}, status=404)
        return web.json_response(
            {
                "employee": employee,
                "seen_by_tool": {
                    "agent": request.headers.get("X-Agentproxy-Agent"),
                    "user": request.headers.get("X-Agentproxy-User"),
                    "task": request.headers.get("X-Agentproxy-Task"),
                    "decision": request.headers.get("X-Agentproxy-Decision"),
                    "traceparent": request.headers.get("traceparent"),
                    "context": await context(request),
                },
            }
        )

    async def list_employees(request: web.Request) -> web.Response:
        # The whole directory, salaries included: the proxy's obligations decide what an
        # agent sees of it.
        return web.json_response({"items": list(EMPLOYEES.values())})

    async def patch(request: web.Request) -> web.Response:
        employee = EMPLOYEES.get(request.match_info["id"])
        if employee is None:
            return web.json_response({"error": "no such employee"}, status=404)
        changes = await request.json()
        employee.update(changes)
        return web.json_response({"updated": employee["id"], "changed": sorted(changes)})

    async def salary(request: web.Request) -> web.Response:
        return web.json_response({"salary": 1_000_000})

    async def update(request: web.Request) -> web.Response:
        return web.json_response(
            {"updated": request.match_info["id"], "body": await request.json()}
        )

    async def delete(request: web.Request) -> web.Response:
        return web.json_response({"deleted": request.match_info["id"]})

    app = web.Application(middlewares=[require_key])
    app.router.add_get("/v1/employees", list_employees)
    app.router.add_get("/v1/employees/{id}", get_employee)
    app.router.add_patch("/v1/employees/{id}", patch)
    app.router.add_get("/v1/employees/{id}/salary", salary)
    app.router.add_put("/v1/employees/{id}", update)
    app.router.add_delete("/v1/employees/{id}", delete)
    return app


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key-file", default=API_KEY_FILE)
    parser.add_argument("--jwks-url", default="http://127.0.0.1:9901/.well-known/jwks.json")
    args = parser.parse_args()
    with open(args.api_key_file) as f:
        api_key = f.read().strip()
    web.run_app(
        make_app(api_key, args.jwks_url),
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
