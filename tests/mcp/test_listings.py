"""Every MCP listing is filtered like `tools/list` (issue 24): `prompts/list`, `resources/list`
and `resources/templates/list` show only what this principal could ever be allowed to get, and
`completion/complete` runs only for a prompt or template it may get.

The upstream is the official SDK's MCPServer (it answers in SSE) for the SDK client in both
protocol generations; a plain aiohttp server answers the batches the SDK does not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx2
import orjson
import pytest
from aiohttp import web
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp.types import Completion, PromptReference, ResourceTemplateReference

from mcp import Client
from tests.conftest import Keys, Proxy, ProxyFactory, start_app
from tests.harness.processes import free_port
from tests.mcp.conftest import serving

POLICY = """
default: deny
rules:
  - id: greetings
    agents: [reader]
    actions: ["mcp:prompts/get/greet"]
    effect: allow
  - id: docs
    agents: [reader]
    actions: ["mcp:resources/read/file:///docs/**"]
    effect: allow
  - id: no-payroll
    agents: ["*"]
    actions: ["mcp:prompts/get/payroll_*", "mcp:resources/read/file:///payroll/**"]
    effect: deny
    reason: payroll is not for agents
  - id: payroll-for-finance
    agents: ["role:finance"]
    actions: ["mcp:prompts/get/payroll_*"]
    effect: allow
  - id: audit-prompt-on-weekdays
    agents: [reader]
    actions: ["mcp:prompts/get/audit"]
    when: 'args.scope == "weekday"'
    effect: allow
"""

MODES = ["legacy", "auto"]


@dataclass
class Catalogue:
    url: str
    completed: list[str] = field(default_factory=list)
    served: list[str] = field(default_factory=list)


def build_server(state: Catalogue) -> MCPServer:
    server = MCPServer("hr-docs")

    @server.prompt()
    def greet(name: str) -> str:
        state.served.append("greet")
        return f"Say hello to {name}."

    @server.prompt()
    def payroll_summary(month: str) -> str:
        state.served.append("payroll_summary")
        return f"Summarize payroll for {month}."

    @server.prompt()
    def audit(scope: str) -> str:
        return f"Audit {scope}."

    @server.resource("file:///docs/handbook.md")
    def handbook() -> str:
        state.served.append("handbook")
        return "the handbook"

    @server.resource("file:///payroll/2026.csv")
    def payroll() -> str:
        state.served.append("payroll")
        return "alice,100000"

    @server.resource("file:///docs/{name}")
    def doc(name: str) -> str:
        return f"doc {name}"

    @server.resource("file:///payroll/{year}")
    def payroll_year(year: str) -> str:
        return f"payroll {year}"

    @server.completion()  # type: ignore[untyped-decorator, no-untyped-call]
    async def completion(ref: Any, argument: Any, context: Any) -> Completion:
        name = ref.name if isinstance(ref, PromptReference) else ref.uri
        state.completed.append(name)
        return Completion(values=[f"{name}:{argument.value}-1"])

    return server


@pytest.fixture
async def catalogue() -> AsyncIterator[Catalogue]:
    port = free_port()
    state = Catalogue(url=f"http://127.0.0.1:{port}")
    app = build_server(state).streamable_http_app()
    async with serving(app, port):
        yield state


@pytest.fixture
async def docs_proxy(make_proxy: ProxyFactory, catalogue: Catalogue) -> Proxy:
    return await make_proxy(
        policy=POLICY, upstream_url=catalogue.url, upstream_extra="    protocol: mcp"
    )


@asynccontextmanager
async def client(
    proxy: Proxy, token: str, mode: str, content_types: list[str] | None = None
) -> AsyncIterator[Client]:
    async def seen(response: httpx2.Response) -> None:
        if content_types is not None:
            content_types.append(response.headers.get("content-type", ""))

    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
        event_hooks={"response": [seen]},
    )
    transport = streamable_http_client(proxy.base + "/mcp", http_client=http)
    async with http, Client(transport, mode=mode) as c:
        yield c


@pytest.mark.parametrize("mode", MODES)
async def test_listings_show_only_what_the_principal_may_get(
    docs_proxy: Proxy, catalogue: Catalogue, keys: Keys, mode: str
) -> None:
    content_types: list[str] = []
    async with client(docs_proxy, keys.token("reader"), mode, content_types) as c:
        prompts = sorted(p.name for p in (await c.list_prompts()).prompts)
        # payroll_summary is denied outright; audit is allowed on a condition: listed
        assert prompts == ["audit", "greet"]
        resources = [str(r.uri) for r in (await c.list_resources()).resources]
        assert resources == ["file:///docs/handbook.md"]
        templates = [t.uri_template for t in (await c.list_resource_templates()).resource_templates]
        assert templates == ["file:///docs/{name}"]
        # what is listed can be used; what is hidden is refused when asked for by name
        assert (await c.read_resource("file:///docs/handbook.md")).contents
        with pytest.raises(MCPError) as denied:
            await c.read_resource("file:///payroll/2026.csv")
        assert denied.value.code == -32003
    assert catalogue.served == ["handbook"]
    if mode == "legacy":
        # The SDK's server answers in SSE: the filtered listings were read as event streams.
        assert any(t.startswith("text/event-stream") for t in content_types)


async def test_finance_sees_the_payroll_prompt_but_not_the_payroll_files(
    docs_proxy: Proxy, keys: Keys
) -> None:
    async with client(docs_proxy, keys.token("fin-bot", roles=["finance"]), "legacy") as c:
        prompts = sorted(p.name for p in (await c.list_prompts()).prompts)
        # deny-overrides: no-payroll denies everyone unconditionally, finance included
        assert prompts == []
        assert (await c.list_resources()).resources == []


@pytest.mark.parametrize("mode", MODES)
async def test_completion_runs_only_for_what_the_principal_may_get(
    docs_proxy: Proxy, catalogue: Catalogue, keys: Keys, mode: str
) -> None:
    async with client(docs_proxy, keys.token("reader"), mode) as c:
        greet = await c.complete(PromptReference(name="greet"), {"name": "name", "value": "al"})
        assert greet.completion.values == ["greet:al-1"]
        doc = await c.complete(
            ResourceTemplateReference(uri="file:///docs/{name}"), {"name": "name", "value": "h"}
        )
        assert doc.completion.values == ["file:///docs/{name}:h-1"]
        with pytest.raises(MCPError) as prompt:
            await c.complete(
                PromptReference(name="payroll_summary"), {"name": "month", "value": "J"}
            )
        assert prompt.value.code == -32003
        assert "mcp:prompts/get/payroll_summary" in str(prompt.value)
        with pytest.raises(MCPError) as template:
            await c.complete(
                ResourceTemplateReference(uri="file:///payroll/{year}"),
                {"name": "year", "value": "20"},
            )
        assert template.value.code == -32003
        # a prompt no rule names at all (the server's own, unlisted) is refused the same way
        with pytest.raises(MCPError) as unknown:
            await c.complete(PromptReference(name="secret"), {"name": "x", "value": ""})
        assert unknown.value.code == -32003
    # the upstream completed only what was allowed
    assert catalogue.completed == ["greet", "file:///docs/{name}"]


# --- batches and hostile listings (a plain server: the SDK answers no batch) -------------------

HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": "2025-03-26",
}
LISTED: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "prompts/list": ("prompts", [{"name": "greet"}, {"name": "payroll_summary"}]),
    "resources/list": (
        "resources",
        [
            {"uri": "file:///docs/handbook.md", "name": "handbook"},
            {"uri": "file:///payroll/2026.csv", "name": "payroll"},
            # listed as under /docs, read by the server as /payroll: never shown
            {"uri": "file:///docs/../payroll/2026.csv", "name": "walk"},
            {"uri": "file:///docs/%2e%2e/payroll/2026.csv", "name": "encoded walk"},
        ],
    ),
    "resources/templates/list": (
        "resourceTemplates",
        [{"uriTemplate": "file:///docs/{name}"}, {"uriTemplate": "file:///payroll/{year}"}],
    ),
}


@dataclass
class Plain:
    url: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    sse: bool = False
    broken: bool = False


def plain_answer(state: Plain, message: dict[str, Any]) -> dict[str, Any]:
    state.messages.append(message)
    method = message["method"]
    if method in LISTED:
        member, items = LISTED[method]
        if state.broken:
            # the hidden item comes twice in a key a last-wins client would read
            return {"jsonrpc": "2.0", "id": message["id"], "result": {member: "not a list"}}
        return {"jsonrpc": "2.0", "id": message["id"], "result": {member: items}}
    return {"jsonrpc": "2.0", "id": message["id"], "result": {"completion": {"values": ["x"]}}}


@pytest.fixture
async def plain() -> AsyncIterator[Plain]:
    state = Plain()

    async def mcp(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        answers = [plain_answer(state, m) for m in body] if isinstance(body, list) else None
        answer: Any = answers if answers is not None else plain_answer(state, body)
        if not state.sse:
            return web.Response(body=orjson.dumps(answer), content_type="application/json")
        # one event per answer, the first with an id and a priming comment, as servers send
        events = [": priming\n\n"]
        for i, each in enumerate(answers if answers is not None else [answer]):
            events.append(f"id: ev-{i}\nevent: message\ndata: {orjson.dumps(each).decode()}\n\n")
        return web.Response(body="".join(events).encode(), content_type="text/event-stream")

    app = web.Application()
    app.router.add_post("/mcp", mcp)
    runner, port = await start_app(app)
    state.url = f"http://127.0.0.1:{port}"
    yield state
    await runner.cleanup()


async def post(proxy: Proxy, token: str, messages: Any, status: int = 200) -> tuple[str, Any]:
    headers = {**HEADERS, "Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.base + "/mcp", data=orjson.dumps(messages), headers=headers) as r,
    ):
        assert r.status == status, await r.text()
        body = await r.read()
        if r.content_type == "text/event-stream":
            lines = body.decode().splitlines()
            answers = [orjson.loads(line[6:]) for line in lines if line.startswith("data: ")]
            return r.content_type, answers
        return r.content_type, orjson.loads(body)


def listing(i: Any, method: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": i, "method": method}


@pytest.mark.parametrize("sse", [False, True], ids=["json", "sse"])
async def test_every_listing_of_a_batch_is_filtered(
    make_proxy: ProxyFactory, plain: Plain, keys: Keys, sse: bool
) -> None:
    plain.sse = sse
    proxy = await make_proxy(
        policy=POLICY, upstream_url=plain.url, upstream_extra="    protocol: mcp"
    )
    batch = [listing("p", "prompts/list"), listing("r", "resources/list")]
    batch.append(listing("t", "resources/templates/list"))
    content_type, answers = await post(proxy, keys.token("reader"), batch)
    assert content_type == ("text/event-stream" if sse else "application/json")
    by_id = {a["id"]: a["result"] for a in answers}
    assert by_id["p"]["prompts"] == [{"name": "greet"}]
    assert by_id["r"]["resources"] == [{"uri": "file:///docs/handbook.md", "name": "handbook"}]
    assert by_id["t"]["resourceTemplates"] == [{"uriTemplate": "file:///docs/{name}"}]
    assert [m["id"] for m in plain.messages] == ["p", "r", "t"]


async def test_a_listing_that_cannot_be_read_is_never_passed_on(
    make_proxy: ProxyFactory, plain: Plain, keys: Keys
) -> None:
    plain.broken = True
    proxy = await make_proxy(
        policy=POLICY, upstream_url=plain.url, upstream_extra="    protocol: mcp"
    )
    for method in LISTED:
        _, answer = await post(proxy, keys.token("reader"), listing(1, method))
        assert answer["error"]["code"] == -32603
        assert "not a list" not in orjson.dumps(answer).decode()


async def test_a_completion_in_a_batch_refuses_the_batch(
    make_proxy: ProxyFactory, plain: Plain, keys: Keys
) -> None:
    proxy = await make_proxy(
        policy=POLICY, upstream_url=plain.url, upstream_extra="    protocol: mcp"
    )
    argument = {"name": "month", "value": "J"}
    allowed = {"ref": {"type": "ref/prompt", "name": "greet"}, "argument": argument}
    hidden = {"ref": {"type": "ref/prompt", "name": "payroll_summary"}, "argument": argument}
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "completion/complete", "params": allowed},
        {"jsonrpc": "2.0", "id": 2, "method": "completion/complete", "params": hidden},
    ]
    _, answers = await post(proxy, keys.token("reader"), batch)
    by_id = {a["id"]: a["error"] for a in answers}
    assert by_id[2]["code"] == -32003
    assert "mcp:prompts/get/payroll_summary" in by_id[2]["message"]
    assert by_id[1]["code"] == -32003  # not forwarded
    # a ref of a type the proxy cannot name is not forwarded either (a body it cannot read)
    odd = {"ref": {"type": "ref/tool", "name": "greet"}, "argument": argument}
    _, answer = await post(
        proxy,
        keys.token("reader"),
        {"jsonrpc": "2.0", "id": 3, "method": "completion/complete", "params": odd},
        status=400,
    )
    assert answer["error"]["code"] == -32600
    assert plain.messages == []
