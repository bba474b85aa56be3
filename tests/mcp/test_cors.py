"""CORS for browser MCP clients (the MCP Inspector; issue 24): a preflight is answered by the
proxy for a listed origin and refused (403, no CORS headers) otherwise — never 401, never
forwarded; answers to a listed origin, the proxy's own 401 and 403 included, carry the origin
and expose the headers a browser client needs; a page of another origin is refused.

The upstream is the official SDK's server behind Starlette's CORSMiddleware allowing every
origin (as the SDK's docs suggest): the proxy, not the upstream, says who may read."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from starlette.middleware.cors import CORSMiddleware

from agentproxy.config import ConfigError
from agentproxy.proxy.runtime import check, load_config
from tests.conftest import Keys, ProxyFactory, Upstream
from tests.harness.processes import free_port
from tests.mcp.conftest import McpUpstream, build_server, serving

INSPECTOR = "http://localhost:6274"
EVIL = "https://evil.example"
CORS = f'    protocol: mcp\n    cors: {{allow_origins: ["{INSPECTOR}", "https://app.example"]}}'
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "inspector", "version": "1"},
    },
}
POLICY = """
default: deny
rules:
  - id: read-tools
    agents: [mcp-agent]
    actions: ["mcp:tools/call/lookup"]
    effect: allow
"""


@pytest.fixture
async def open_upstream() -> AsyncIterator[McpUpstream]:
    """The SDK server, wrapped to allow every origin and expose its session header."""
    port = free_port()
    state = McpUpstream(url=f"http://127.0.0.1:{port}")
    app = CORSMiddleware(
        build_server(state).streamable_http_app(),
        allow_origins=["*"],
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=["Mcp-Session-Id"],
    )
    async with serving(app, port):
        try:
            yield state
        finally:
            state.release.set()


def preflight(origin: str, method: str = "POST") -> dict[str, str]:
    # What a browser sends before a fetch() with an Authorization header: no credential.
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization,content-type,mcp-protocol-version",
    }


async def test_a_preflight_from_a_listed_origin_is_answered_by_the_proxy(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(policy=POLICY, upstream_extra=CORS)
    async with (
        aiohttp.ClientSession() as s,
        s.options(proxy.base + "/mcp", headers=preflight(INSPECTOR)) as r,
    ):
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == INSPECTOR
        allowed = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
        assert {
            "authorization",
            "content-type",
            "mcp-session-id",
            "mcp-protocol-version",
            "last-event-id",
        } <= allowed
        assert set(r.headers["Access-Control-Allow-Methods"].split(", ")) == {
            "GET",
            "POST",
            "DELETE",
        }
        assert int(r.headers["Access-Control-Max-Age"]) > 0
        assert "Origin" in r.headers["Vary"]
        # no ambient credential ever rides a cross-origin request
        assert "Access-Control-Allow-Credentials" not in r.headers
    assert upstream.seen == []


@pytest.mark.parametrize(
    "origin",
    [
        EVIL,
        "http://localhost:6275",  # another port is another origin
        "https://localhost:6274",  # another scheme too
        "HTTP://LOCALHOST:6274",  # browsers never send this; compared exactly
        "http://localhost:6274/",
        "null",  # sandboxed iframes and file:// pages
        "http://localhost:6274.evil.example",
    ],
)
async def test_a_preflight_from_another_origin_is_refused_without_cors_headers(
    make_proxy: ProxyFactory, upstream: Upstream, origin: str
) -> None:
    proxy = await make_proxy(policy=POLICY, upstream_extra=CORS)
    async with (
        aiohttp.ClientSession() as s,
        s.options(proxy.base + "/mcp", headers=preflight(origin)) as r,
    ):
        assert r.status == 403
        assert not [h for h in r.headers if h.lower().startswith("access-control-")]
        problem = orjson.loads(await r.read())
        assert problem["type"].endswith("/cors-refused")
        assert "not in cors.allow_origins of upstream tool" in problem["detail"]
    assert upstream.seen == []


async def test_without_cors_a_preflight_is_refused_with_the_fix_never_401(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(policy=POLICY, upstream_extra="    protocol: mcp")
    async with aiohttp.ClientSession() as s:
        for path in ("/mcp", "/admin/export"):
            async with s.options(proxy.base + path, headers=preflight(INSPECTOR)) as r:
                assert r.status == 403
                assert "Access-Control-Allow-Origin" not in r.headers
                detail = orjson.loads(await r.read())["detail"]
                assert f'cors: {{allow_origins: ["{INSPECTOR}"]}}' in detail
        # an OPTIONS that is no preflight is an ordinary call, as before: a token first
        async with s.options(proxy.base + "/mcp") as r:
            assert r.status == 401
    assert upstream.seen == []


async def test_the_proxys_401_is_readable_by_a_listed_origin(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(policy=POLICY, upstream_extra=CORS)
    headers = {"Origin": INSPECTOR, "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.base + "/mcp", data=orjson.dumps(INITIALIZE), headers=headers) as r,
    ):
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert r.headers["Access-Control-Allow-Origin"] == INSPECTOR
        exposed = r.headers["Access-Control-Expose-Headers"].lower()
        assert "www-authenticate" in exposed and "mcp-session-id" in exposed
        assert r.headers["Vary"] == "Origin"
    assert upstream.seen == []


async def test_a_listed_origin_reads_the_answer_and_its_session(
    make_proxy: ProxyFactory, open_upstream: McpUpstream, keys: Keys
) -> None:
    proxy = await make_proxy(policy=POLICY, upstream_url=open_upstream.url, upstream_extra=CORS)
    # The Origin goes on to the upstream, which may check it too: the SDK's server allows
    # localhost origins by default (its DNS-rebinding protection), so the Inspector's passes.
    headers = {
        "Origin": INSPECTOR,
        "Authorization": f"Bearer {keys.token('mcp-agent')}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
    }
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.base + "/mcp", data=orjson.dumps(INITIALIZE), headers=headers) as r,
    ):
        assert r.status == 200, await r.text()
        assert r.headers["Mcp-Session-Id"]
        # the proxy's answer, not the upstream's "*": only the listed origin, echoed
        assert r.headers.getall("Access-Control-Allow-Origin") == [INSPECTOR]
        assert "mcp-session-id" in r.headers["Access-Control-Expose-Headers"].lower()
        assert "Origin" in r.headers.getall("Vary")
        assert b"hr-tools" in await r.read()


async def test_a_page_of_another_origin_is_refused_before_the_upstream(
    make_proxy: ProxyFactory, open_upstream: McpUpstream, keys: Keys
) -> None:
    # The upstream itself would let any origin read (allow_origins ["*"]); with a token the
    # page obtained, a DNS-rebinding or malicious page must still get nothing through us.
    proxy = await make_proxy(policy=POLICY, upstream_url=open_upstream.url, upstream_extra=CORS)
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call"}
    call["params"] = {"name": "lookup", "arguments": {"id": "7"}}
    headers = {
        "Origin": EVIL,
        "Authorization": f"Bearer {keys.token('mcp-agent')}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2026-07-28",
    }
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.base + "/mcp", data=orjson.dumps(call), headers=headers) as r,
    ):
        assert r.status == 403
        assert "Access-Control-Allow-Origin" not in r.headers
    assert open_upstream.calls == []


# --- configuration ------------------------------------------------------------------------------


def config_problems(tmp_path: Path, cors: str, protocol: str = "mcp") -> list[str]:
    (tmp_path / "pub.pem").write_text("not checked by the loader\n")
    (tmp_path / "p.yaml").write_text(POLICY)
    url = "grpc://127.0.0.1:50051" if protocol == "grpc" else "http://127.0.0.1:8000"
    path = tmp_path / "agentproxy.yaml"
    path.write_text(
        f"""\
listen: {{http: "127.0.0.1:8080", admin: "127.0.0.1:9901"}}
upstreams:
  - name: tools
    url: "{url}"
    protocol: {protocol}
    cors: {cors}
identity:
  issuers:
    - {{issuer: https://idp, audiences: [a], public_key_file: pub.pem, algorithms: [RS256]}}
policy_files: [p.yaml]
"""
    )
    try:
        check(load_config(path))
    except ConfigError as exc:
        return str(exc).splitlines()
    return []


@pytest.mark.parametrize(
    ("cors", "message"),
    [
        ('{allow_origins: ["*"]}', '"*" is not allowed'),
        ('{allow_origins: ["https://App.example"]}', "write 'https://app.example'"),
        ('{allow_origins: ["https://app.example/"]}', "write 'https://app.example'"),
        ('{allow_origins: ["https://app.example/mcp"]}', "no path or trailing slash"),
        ('{allow_origins: ["https://app.example:443"]}', "write 'https://app.example'"),
        ('{allow_origins: ["http://app.example:80"]}', "write 'http://app.example'"),
        ('{allow_origins: ["http://app.example:99999"]}', "out of range"),
        ('{allow_origins: ["ftp://app.example"]}', "http or https"),
        ('{allow_origins: ["app.example"]}', "scheme://host[:port]"),
        ('{allow_origins: ["null"]}', "scheme://host[:port]"),
        ('{allow_origins: ["https://user@app.example"]}', "scheme://host[:port]"),
        ('{allow_origins: ["https://a.example", "https://a.example"]}', "listed twice"),
        ("{allow_origins: []}", "at least one origin"),
        ("{}", 'missing required key "allow_origins"'),
        ('{allow_origins: ["https://a.example"], allow_credentials: true}', "unknown key"),
        ('["https://a.example"]', "must be a mapping"),
    ],
)
def test_the_loader_says_what_to_change(tmp_path: Path, cors: str, message: str) -> None:
    found = config_problems(tmp_path, cors)
    assert any(".cors" in line and message in line for line in found), found


def test_origins_as_browsers_send_them_load(tmp_path: Path) -> None:
    good = '{allow_origins: ["http://localhost:6274", "https://app.example", "http://[::1]:8080"]}'
    assert config_problems(tmp_path, good) == []
    assert config_problems(tmp_path, good, protocol="http") == []
    grpc = config_problems(tmp_path, good, protocol="grpc")
    assert any("applies to HTTP protocols" in line for line in grpc), grpc


async def test_a_preflight_for_the_public_metadata_is_answered_for_any_origin(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    # The MCP SDKs fetch RFC 9728 metadata with MCP-Protocol-Version: a browser preflights it.
    extra = (
        '    protocol: mcp\n    audiences: ["https://tools.example/mcp"]\n'
        '    authorization: {servers: ["https://idp.example"]}'
    )
    proxy = await make_proxy(policy=POLICY, upstream_extra=extra)
    ask = preflight(EVIL, "GET") | {"Access-Control-Request-Headers": "mcp-protocol-version"}
    async with aiohttp.ClientSession() as s:
        path = proxy.base + "/.well-known/oauth-protected-resource/mcp"
        async with s.options(path, headers=ask) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert "MCP-Protocol-Version" in r.headers["Access-Control-Allow-Headers"]
            assert "Access-Control-Allow-Credentials" not in r.headers
        # the endpoint itself is not public: its preflight is refused without cors:
        async with s.options(proxy.base + "/mcp", headers=preflight(EVIL)) as r:
            assert r.status == 403
    assert upstream.seen == []
