"""Paths that upstream frameworks read differently from the proxy, and `upstreams[].paths`,
which declares how the upstream reads them: Express routes case-insensitively, Starlette's
`{id:int}` reads `/01` as 1. Each test runs the framework itself and asserts what it got."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.conftest import Keys, ProxyFactory
from tests.harness.processes import free_port
from tests.proxy.conftest import raw_request

NODE_MODULES = Path(__file__).resolve().parents[2] / ".cache" / "node" / "node_modules"

POLICY = """
default: deny
rules:
  - id: reads
    agents: [reader]
    actions: ["http:GET /**"]
    effect: allow
  - id: no-admin
    agents: ["*"]
    actions: ["http:* /admin/**"]
    effect: deny
    reason: the admin routes are not for agents
  - id: not-root
    agents: ["*"]
    actions: ["http:GET /v1/users/{id}"]
    when: 'resource.id == "Root"'
    effect: deny
  - id: not-item-one
    agents: ["*"]
    actions: ["http:GET /v1/items/{id}"]
    when: 'resource.id == "1"'
    effect: deny
"""

EXPRESS_APP = """
const express = require("express");
const app = express();  // routing is case-insensitive by default
const log = (fields) => console.log(JSON.stringify(fields));
app.get("/admin/export", (req, res) => {
  log({route: "export", path: req.path});
  res.json({exported: true});
});
app.get("/v1/users/:id", (req, res) => {
  log({route: "user", id: req.params.id});
  res.json({id: req.params.id});
});
const server = app.listen(0, "127.0.0.1", () => log({port: server.address().port}));
"""


@dataclass
class Express:
    url: str
    process: asyncio.subprocess.Process
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def settle(self) -> list[dict[str, Any]]:
        """What the app logged so far (each request logs one line before it answers)."""
        assert self.process.stdout is not None
        while True:
            try:
                line = await asyncio.wait_for(self.process.stdout.readline(), 0.3)
            except TimeoutError:
                return self.seen
            if not line:
                return self.seen
            self.seen.append(orjson.loads(line))


@pytest.fixture
async def express(tmp_path: Path) -> AsyncIterator[Express]:
    assert (NODE_MODULES / "express").is_dir(), "Express is missing: run `make node-deps`"
    (tmp_path / "app.js").write_text(EXPRESS_APP)
    process = await asyncio.create_subprocess_exec(
        "node",
        str(tmp_path / "app.js"),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
    )
    assert process.stdout is not None
    port = orjson.loads(await asyncio.wait_for(process.stdout.readline(), 20))["port"]
    try:
        yield Express(f"http://127.0.0.1:{port}", process)
    finally:
        process.terminate()
        await process.wait()


async def get(base: str, token: str, path: str) -> int:
    response = await raw_request(base, "GET", path, [("Authorization", f"Bearer {token}")])
    return response.status


async def test_express_reads_paths_whatever_their_case_and_so_does_policy(
    make_proxy: ProxyFactory, express: Express, keys: Keys
) -> None:
    token = keys.token("reader")
    # As sent, without the declaration: /ADMIN/export is not /admin/**, and Express serves it.
    plain = await make_proxy(policy=POLICY, upstream_url=express.url)
    assert await get(plain.base, token, "/ADMIN/export") == 200
    assert (await express.settle())[-1] == {"route": "export", "path": "/ADMIN/export"}
    express.seen.clear()

    declared = await make_proxy(
        policy=POLICY, upstream_url=express.url, upstream_extra="    paths: {case: insensitive}"
    )
    for path in ("/ADMIN/export", "/Admin/Export", "/admin/EXPORT", "/aDmIn/export"):
        assert await get(declared.base, token, path) == 403, path
    # Bindings keep the case sent (Express passes "Root" on): the deny on "Root" holds at
    # any case of the route, and other ids pass with their case.
    assert await get(declared.base, token, "/V1/USERS/Root") == 403
    assert await get(declared.base, token, "/V1/Users/alice") == 200
    assert await express.settle() == [{"route": "user", "id": "alice"}]


@dataclass
class Items:
    url: str
    seen: list[int] = field(default_factory=list)


@pytest.fixture
async def starlette_items() -> AsyncIterator[Items]:
    port = free_port()
    state = Items(f"http://127.0.0.1:{port}")

    async def item(request: Request) -> JSONResponse:
        state.seen.append(request.path_params["id"])
        return JSONResponse({"id": request.path_params["id"]})

    app = Starlette(routes=[Route("/v1/items/{id:int}", item)])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for this
        await asyncio.sleep(0.02)
    try:
        yield state
    finally:
        server.should_exit = True
        await task


async def test_starlette_integer_segments_are_bound_in_canonical_form(
    make_proxy: ProxyFactory, starlette_items: Items, keys: Keys
) -> None:
    token = keys.token("reader")
    # As sent: "01" is not "1" to policy, and Starlette reads it as item 1.
    plain = await make_proxy(policy=POLICY, upstream_url=starlette_items.url)
    assert await get(plain.base, token, "/v1/items/01") == 200
    assert starlette_items.seen == [1]
    starlette_items.seen.clear()

    declared = await make_proxy(
        policy=POLICY,
        upstream_url=starlette_items.url,
        upstream_extra="    paths: {integer_segments: canonical}",
    )
    for path in ("/v1/items/01", "/v1/items/001", "/v1/items/+1", "/v1/items/%D9%A1"):
        assert await get(declared.base, token, path) == 400, path
    assert await get(declared.base, token, "/v1/items/1") == 403  # the deny holds
    assert await get(declared.base, token, "/v1/items/2") == 200
    assert await get(declared.base, token, "/v1/items/0") == 200
    assert starlette_items.seen == [2, 0]
