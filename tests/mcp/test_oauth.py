"""MCP authorization the way real MCP clients follow it (spec 2026-07-28), through the proxy
to the official SDK's server, with a real authorization server (oidc-provider):

- protected resource metadata (RFC 9728) at the path-suffixed and bare well-known paths,
  without a token, and a 401 that names it;
- the official Python SDK's OAuth client (client credentials) discovering all of it, getting
  a token for the resource (RFC 8707) and calling;
- a rule's `scopes:` as policy: a token without them gets the spec's 403
  `insufficient_scope` and the SDK steps up; `scope_challenge: jsonrpc` for older clients;
- a token issued for another MCP server is refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import orjson
import pytest
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

from mcp import Client as McpClient
from tests.conftest import CustomProxyFactory, Proxy, Upstream
from tests.harness import node
from tests.harness.oidc import Client, OpenIdProvider, run_provider
from tests.harness.processes import free_port
from tests.mcp.conftest import McpUpstream

OTHER = "https://finance.example/mcp"
AGENT = Client("mcp-agent", "agent-secret", scope="hr:read hr:write")

POLICY = b"""
default: deny
rules:
  - id: lookups
    agents: [mcp-agent]
    actions: ["mcp:tools/call/lookup"]
    scopes: [hr:read]
    effect: allow
  - id: transfers
    agents: [mcp-agent]
    actions: ["mcp:tools/call/transfer"]
    scopes: [hr:read, hr:write]
    effect: allow
"""


class Memory:
    """The SDK's token storage, in memory."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
async def op(tmp_path: Path, port: int) -> AsyncIterator[OpenIdProvider]:
    resources = {
        f"http://127.0.0.1:{port}/mcp": {"scope": "hr:read hr:write"},
        OTHER: {"scope": "hr:read hr:write"},
        "https://agentproxy.test": {"scope": "hr:read hr:write"},  # the issuer's audience
    }
    async with run_provider(tmp_path, [AGENT], resources) as provider:
        yield provider


async def start(
    custom_proxy: CustomProxyFactory,
    op: OpenIdProvider,
    upstream: McpUpstream,
    port: int,
    challenge: str = "http403",
    extra: str = "",
    policy: bytes = POLICY,
) -> Proxy:
    resource = f"http://127.0.0.1:{port}/mcp"
    text = f"""
listen: {{http: "127.0.0.1:{port}", admin: "127.0.0.1:0"}}
upstreams:
  - name: hr
    url: "{upstream.url}"
    protocol: mcp
    audiences: ["{resource}"]
    authorization:
      servers: ["{op.issuer}"]
      scopes_supported: [hr:read, hr:write]
    scope_challenge: {challenge}
{extra}identity:
  issuers:
    - issuer: "{op.issuer}"
      discovery: true
      audiences: ["https://agentproxy.test"]
      algorithms: [RS256]
policy_files: [policy.yaml]
decision_log: "off"
"""
    return await custom_proxy(text, {"policy.yaml": policy})


async def post(proxy: Proxy, token: str | None, body: dict[str, Any]) -> aiohttp.ClientResponse:
    headers = {"Accept": "application/json, text/event-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as s:
        response = await s.post(proxy.base + "/mcp", json=body, headers=headers)
        await response.read()
        return response


CALL = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/call",
    "params": {"name": "transfer", "arguments": {"amount": 5, "to": "bob"}},
}


async def test_discovery_metadata_and_the_401_that_names_it(
    op: OpenIdProvider, mcp_upstream: McpUpstream, custom_proxy: CustomProxyFactory, port: int
) -> None:
    proxy = await start(custom_proxy, op, mcp_upstream, port)
    resource = f"http://127.0.0.1:{port}/mcp"
    async with aiohttp.ClientSession() as s:
        for path in (
            "/.well-known/oauth-protected-resource/mcp",
            "/.well-known/oauth-protected-resource",
        ):
            async with s.get(proxy.base + path) as r:
                assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
                assert await r.json() == {
                    "resource": resource,
                    "authorization_servers": [op.issuer],
                    "bearer_methods_supported": ["header"],
                    "scopes_supported": ["hr:read", "hr:write"],
                }
        # Only the published paths: no other well-known path answers undecided.
        async with s.get(proxy.base + "/.well-known/oauth-protected-resource/other") as r:
            assert r.status == 401
    missing = await post(proxy, None, CALL)
    assert missing.status == 401
    challenge = missing.headers["WWW-Authenticate"]
    assert challenge == (
        f'Bearer scope="hr:read", resource_metadata='
        f'"http://127.0.0.1:{port}/.well-known/oauth-protected-resource/mcp"'
    )
    bad = await post(proxy, "not-a-token", CALL)
    assert 'error="invalid_token"' in bad.headers["WWW-Authenticate"]
    assert "resource_metadata=" in bad.headers["WWW-Authenticate"]
    assert mcp_upstream.calls == []


async def test_the_python_sdk_discovers_gets_a_token_and_steps_up(
    op: OpenIdProvider, mcp_upstream: McpUpstream, custom_proxy: CustomProxyFactory, port: int
) -> None:
    proxy = await start(custom_proxy, op, mcp_upstream, port)
    storage = Memory()
    auth = ClientCredentialsOAuthProvider(
        server_url=proxy.base + "/mcp",
        storage=storage,
        client_id=AGENT.client_id,
        client_secret=AGENT.client_secret,
        scope="hr:read",
        issuer=op.issuer,
    )
    http = httpx2.AsyncClient(auth=auth, timeout=10)
    transport = streamable_http_client(proxy.base + "/mcp", http_client=http)
    async with http, McpClient(transport, mode="auto") as client:
        result = await client.call_tool("lookup", {"id": "7"})
        assert not result.is_error
        assert storage.tokens is not None and storage.tokens.scope == "hr:read"
        # transfer needs hr:write: 403 insufficient_scope, the SDK asks again with both.
        result = await client.call_tool("transfer", {"amount": 5, "to": "bob"})
        assert not result.is_error
        assert set((storage.tokens.scope or "").split()) == {"hr:read", "hr:write"}
    assert mcp_upstream.calls == ["lookup", "transfer"]
    assert (await op.stats())["client_credentials"] == 2


async def test_insufficient_scope_is_the_specs_403_or_a_jsonrpc_error(
    op: OpenIdProvider, mcp_upstream: McpUpstream, custom_proxy: CustomProxyFactory, port: int
) -> None:
    resource = f"http://127.0.0.1:{port}/mcp"
    token = await op.client_credentials(AGENT, resource, "hr:read")
    proxy = await start(custom_proxy, op, mcp_upstream, port)
    refused = await post(proxy, token, CALL)
    assert refused.status == 403
    assert refused.headers["WWW-Authenticate"] == (
        f'Bearer error="insufficient_scope", scope="hr:read hr:write", resource_metadata='
        f'"http://127.0.0.1:{port}/.well-known/oauth-protected-resource/mcp"'
    )
    await proxy.server.stop()
    older = await start(custom_proxy, op, mcp_upstream, port, challenge="jsonrpc")
    async with aiohttp.ClientSession() as s:
        headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json, text/event-stream",
        }
        async with s.post(older.base + "/mcp", json=CALL, headers=headers) as r:
            assert r.status == 200 and "WWW-Authenticate" not in r.headers
            error = orjson.loads(await r.read())["error"]
    assert error["code"] == -32003 and "lacks hr:write" in error["message"]
    assert mcp_upstream.calls == []


async def test_a_token_for_another_mcp_server_is_refused(
    op: OpenIdProvider, mcp_upstream: McpUpstream, custom_proxy: CustomProxyFactory, port: int
) -> None:
    finance = f"""  - name: finance
    url: "{mcp_upstream.url}"
    protocol: mcp
    match: {{path_prefix: /finance}}
    endpoint: /finance/mcp
    audiences: ["{OTHER}"]
"""
    proxy = await start(custom_proxy, op, mcp_upstream, port, extra=finance)
    elsewhere = await op.client_credentials(AGENT, OTHER, "hr:read hr:write")
    refused = await post(proxy, elsewhere, CALL)
    assert refused.status == 401
    assert "RFC 8707" in refused.headers["WWW-Authenticate"]
    # And the other way round: hr's token is no key to finance.
    hr = await op.client_credentials(AGENT, f"http://127.0.0.1:{port}/mcp", "hr:read hr:write")
    async with aiohttp.ClientSession() as s:
        headers = {"Authorization": f"Bearer {hr}", "Accept": "application/json, text/event-stream"}
        async with s.post(proxy.base + "/finance/mcp", json=CALL, headers=headers) as r:
            assert r.status == 401
    # A token for this server's own resource URI is the key.
    initialize = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "test", "version": "1"},
        },
    }
    assert (await post(proxy, hr, initialize)).status == 200
    assert mcp_upstream.calls == []


@pytest.mark.parametrize(
    ("resource", "url"),
    [
        (
            "https://tools.example/hr/mcp",
            "https://tools.example/.well-known/oauth-protected-resource/hr/mcp",
        ),
        (
            "https://tools.example/mcp/",
            "https://tools.example/.well-known/oauth-protected-resource/mcp",
        ),
        ("https://tools.example", "https://tools.example/.well-known/oauth-protected-resource"),
        (
            "http://127.0.0.1:8080/mcp",
            "http://127.0.0.1:8080/.well-known/oauth-protected-resource/mcp",
        ),
    ],
)
def test_the_metadata_url_is_the_resource_with_the_well_known_path_inserted(
    resource: str, url: str
) -> None:
    from agentproxy.config.model import metadata_url

    assert metadata_url(resource) == url


def test_scopes_are_read_as_issuers_write_them() -> None:
    from agentproxy.config.model import ClaimNames
    from agentproxy.errors import Unauthenticated
    from agentproxy.identity.principal import principal_from_claims

    def scopes(claims: dict[str, Any], names: ClaimNames | None = None) -> frozenset[str]:
        claims = {"sub": "a", **claims}
        return principal_from_claims(claims, names or ClaimNames(), "iss", 0.0).scopes

    assert scopes({"scope": "hr:read  hr:write"}) == {"hr:read", "hr:write"}
    assert scopes({"scp": "Files.Read User.Read"}) == {"Files.Read", "User.Read"}  # Entra
    assert scopes({"scp": ["a", "b"]}) == {"a", "b"}  # Okta writes a list
    assert scopes({"perms": {"s": "x y"}}, ClaimNames(scopes="perms.s")) == {"x", "y"}
    assert scopes({}) == frozenset()
    for bad in ({"scope": 7}, {"scope": ['a"b']}, {"scope": {"a": 1}}):
        with pytest.raises(Unauthenticated):
            scopes(bad)


@pytest.mark.parametrize(
    ("upstream", "rule", "expected"),
    [
        ("    authorization: {servers: [https://idp.example]}\n", "", "needs audiences"),
        (
            '    audiences: ["https://t.example/mcp"]\n    authorization: {servers: []}\n',
            "",
            "at least one authorization server",
        ),
        ('    audiences: ["hr-api"]\n', "", "absolute http(s) URI"),
        ("    scope_challenge: jsonrpc\n", "", "is for MCP upstreams"),
        (
            '    audiences: ["https://a.example/mcp"]\n'
            "    authorization: {servers: [https://idp.example]}\n"
            '  - name: b\n    url: "http://127.0.0.1:8001"\n    match: {path_prefix: /b}\n'
            '    audiences: ["https://b.example/mcp"]\n'
            "    authorization: {servers: [https://idp.example]}\n",
            "",
            "give the resources different paths",
        ),
        ("", "    scopes: [hr:write]\n", "a deny applies whatever the token holds"),
        ("", '    scopes: ["bad scope"]\n', "not a scope token"),
    ],
)
def test_the_loader_refuses_what_would_not_bind_tokens(
    tmp_path: Path, upstream: str, rule: str, expected: str
) -> None:
    from tests.config.test_loader import MAIN, problems, write

    policy = (
        "default: deny\nrules:\n  - id: r\n    agents: [a]\n"
        '    actions: ["http:GET /x"]\n    effect: deny\n' + rule
    )
    text = MAIN.replace("    timeout: 5s\n", "    timeout: 5s\n" + upstream)
    found = problems(write(tmp_path, text, policy))
    assert any(expected in line for line in found), found


TS_CLIENT = Path(__file__).resolve().parents[1] / "harness" / "mcp_client.mjs"


async def ts_client(directory: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The official TypeScript SDK's client (tests/harness/mcp_client.mjs), run once."""
    assert node.available("@modelcontextprotocol/sdk"), "run `make node-deps`"
    script = node.prepare(directory, TS_CLIENT)
    process = await asyncio.create_subprocess_exec(
        "node",
        str(script),
        orjson.dumps(settings).decode(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode(errors="replace")
    result: dict[str, Any] = orjson.loads(out.splitlines()[-1])
    return result


async def test_the_typescript_sdk_discovers_gets_a_token_and_is_challenged_for_scope(
    op: OpenIdProvider,
    mcp_upstream: McpUpstream,
    custom_proxy: CustomProxyFactory,
    port: int,
    tmp_path: Path,
) -> None:
    proxy = await start(custom_proxy, op, mcp_upstream, port)
    calls = [
        {"name": "lookup", "arguments": {"id": "7"}},
        {"name": "transfer", "arguments": {"amount": 5, "to": "bob"}},
        {"name": "admin_reset", "arguments": {}},
    ]
    settings = {
        "url": proxy.base + "/mcp",
        "client_id": AGENT.client_id,
        "client_secret": AGENT.client_secret,
        "scope": "hr:read",
        "issuer": op.issuer,
        "calls": calls,
        "flow": "client_credentials",
    }
    result = await ts_client(tmp_path, settings)
    assert "error" not in result, result
    # tools/list shows what the agent could use, step-up included; admin_reset has no rule.
    assert result["tools"] == ["lookup", "transfer"]
    lookup, transfer, admin = result["results"]
    assert lookup == {"ok": True, "text": "record 7"}
    # The SDK reads the 403's insufficient_scope and asks again; its client-credentials
    # provider (1.32.2) asks for its configured scope, not the challenged one, so the call
    # stays refused; its authorization-code flow asks for the challenged scope.
    assert transfer["code"] == 403 and "upscoping" in transfer["error"]
    assert not admin["ok"] and "no rule allows" in admin["error"]
    assert result["scope"] == "hr:read"
    # Configured for the scope the rule needs, the same client makes the call.
    result = await ts_client(
        tmp_path, {**settings, "scope": "hr:read hr:write", "calls": calls[1:2]}
    )
    assert result["results"] == [{"ok": True, "text": "sent 5.0 to bob"}]
    assert mcp_upstream.calls == ["lookup", "transfer"]


async def test_the_typescript_sdk_signs_a_person_in_as_ide_clients_do_and_steps_up(
    op: OpenIdProvider,
    mcp_upstream: McpUpstream,
    custom_proxy: CustomProxyFactory,
    port: int,
    tmp_path: Path,
) -> None:
    # Claude Code, VS Code and Cursor: no client configured anywhere, a person signs in.
    people = POLICY.replace(b"agents: [mcp-agent]", b"agents: [alice]")
    proxy = await start(custom_proxy, op, mcp_upstream, port, policy=people)
    result = await ts_client(
        tmp_path,
        {
            "url": proxy.base + "/mcp",
            "flow": "authorization_code",
            "user": "alice",
            "calls": [
                {"name": "lookup", "arguments": {"id": "7"}},
                {"name": "transfer", "arguments": {"amount": 5, "to": "bob"}},
            ],
        },
    )
    assert "error" not in result, result
    assert result["tools"] == ["lookup", "transfer"]
    assert result["results"] == [
        {"ok": True, "text": "record 7"},
        {"ok": True, "text": "sent 5.0 to bob"},
    ]
    # Registered itself once, signed in for hr:read, and again for hr:write on the 403.
    stats = await op.stats()
    assert (stats["registered"], stats["authorization_code"]) == (1, 2)
    assert result["sign_ins"] == 2
    assert set(result["scope"].split()) >= {"hr:read", "hr:write"}
    assert mcp_upstream.calls == ["lookup", "transfer"]


async def test_an_mcp_servers_token_opens_no_plain_http_upstream_beside_it(
    op: OpenIdProvider,
    mcp_upstream: McpUpstream,
    upstream: Upstream,
    custom_proxy: CustomProxyFactory,
    port: int,
) -> None:
    # The attacker holds a token bound (RFC 8707) to the MCP server only, and tries it on an
    # ordinary HTTP upstream the same rules would let the agent call.
    files = f"""  - name: files
    url: "{upstream.url}"
    match: {{path_prefix: /files}}
"""
    policy = (
        POLICY
        + b"""
  - id: files
    agents: [mcp-agent]
    actions: ["http:GET /files/**"]
    effect: allow
"""
    )
    proxy = await start(custom_proxy, op, mcp_upstream, port, extra=files, policy=policy)
    hr = await op.client_credentials(AGENT, f"http://127.0.0.1:{port}/mcp", "hr:read")
    entry = await op.client_credentials(AGENT, "https://agentproxy.test", "hr:read")
    async with aiohttp.ClientSession() as s:
        for token, status in ((hr, 401), (entry, 200)):
            headers = {"Authorization": f"Bearer {token}"}
            async with s.get(proxy.base + "/files/report", headers=headers) as r:
                assert r.status == status
    assert len(upstream.seen) == 1
    assert upstream.seen[0].headers.get("Authorization") is None


async def test_in_a_batch_a_deny_wins_over_a_step_up(
    op: OpenIdProvider, mcp_upstream: McpUpstream, custom_proxy: CustomProxyFactory, port: int
) -> None:
    # transfer lacks hr:write; wipe is allowed by no rule whatever the token holds. Asking the
    # person to consent to more scope would not let this batch through: deny-overrides says
    # it is refused as denied, with no insufficient_scope challenge to step up on.
    resource = f"http://127.0.0.1:{port}/mcp"
    token = await op.client_credentials(AGENT, resource, "hr:read")
    proxy = await start(custom_proxy, op, mcp_upstream, port)
    wipe = {**CALL, "id": 2, "params": {"name": "wipe", "arguments": {}}}
    async with aiohttp.ClientSession() as s:
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        async with s.post(proxy.base + "/mcp", json=[CALL, wipe], headers=headers) as r:
            assert "insufficient_scope" not in r.headers.get("WWW-Authenticate", "")
            answers = {a["id"]: a["error"] for a in orjson.loads(await r.read())}
    assert "no rule allows mcp:tools/call/wipe" in answers[2]["message"]
    assert answers[1]["message"] == "not forwarded: another request in this batch was refused"
    assert mcp_upstream.calls == []
