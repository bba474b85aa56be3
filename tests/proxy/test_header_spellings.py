"""Header names an upstream reads differently from the proxy: `_` for `-` (CGI/WSGI servers
map both to HTTP_X_…), method overrides, original-URL and client-address headers, and the
forwarded host. The upstream is the standard library's WSGI server (wsgiref), which joins
`X-Agentproxy-User` and `X_Agentproxy_User` into one HTTP_X_AGENTPROXY_USER."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

from tests.conftest import UPSTREAM_SECRET, Keys, ProxyFactory
from tests.proxy.conftest import raw_request

POLICY = """
default: deny
rules:
  - id: reads
    agents: [assistant]
    actions: ["http:GET /v1/**"]
    effect: allow
"""


@dataclass
class Wsgi:
    url: str = ""
    environs: list[dict[str, Any]] = field(default_factory=list)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture
def wsgi() -> Iterator[Wsgi]:
    state = Wsgi()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        state.environs.append(
            {k: v for k, v in environ.items() if k.startswith("HTTP_") or k == "REQUEST_METHOD"}
        )
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    server: WSGIServer = make_server("127.0.0.1", 0, app, handler_class=_Quiet)
    state.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


SPOOFED = [
    ("X_Agentproxy_User", "ops-admin"),
    ("X_Agentproxy_Agent", "root"),
    ("X_Agentproxy_Approval", "forged"),
    ("x_agentproxy_decision", "forged"),
    ("X_Api_Key", "the-agent-s-own-key"),
    ("X_Forwarded_For", "10.9.9.9"),
    ("X_Forwarded_Host", "evil.test"),
    ("X-HTTP-Method-Override", "DELETE"),
    ("X_HTTP_Method_Override", "DELETE"),
    ("X-Method-Override", "DELETE"),
    ("X-HTTP-Method", "DELETE"),
    ("X-Original-URL", "/admin/wipe"),
    ("X_Original_URL", "/admin/wipe"),
    ("X-Rewrite-URL", "/admin/wipe"),
    ("X-Real-IP", "10.9.9.9"),
    ("True-Client-IP", "10.9.9.9"),
    ("X-Client-IP", "10.9.9.9"),
    ("Connection", "close, X_Agentproxy_Agent"),
]


async def test_underscore_and_override_headers_never_reach_a_wsgi_upstream(
    make_proxy: ProxyFactory, wsgi: Wsgi, keys: Keys
) -> None:
    proxy = await make_proxy(policy=POLICY, upstream_url=wsgi.url)
    token = keys.token("alice", act={"sub": "assistant"})
    response = await raw_request(
        proxy.base,
        "GET",
        "/v1/reports",
        [("Authorization", f"Bearer {token}"), *SPOOFED],
    )
    assert response.status == 200, response.body
    (environ,) = wsgi.environs
    # Each is the proxy's own value, alone (wsgiref joins duplicates with a comma).
    assert environ["HTTP_X_AGENTPROXY_USER"] == "alice"
    assert environ["HTTP_X_AGENTPROXY_AGENT"] == "assistant"
    assert "HTTP_X_AGENTPROXY_APPROVAL" not in environ
    assert "forged" not in environ["HTTP_X_AGENTPROXY_DECISION"]
    assert environ["HTTP_X_API_KEY"] == UPSTREAM_SECRET
    assert environ["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"
    assert "HTTP_X_FORWARDED_HOST" not in environ  # none configured: never the agent's Host
    for name in (
        "HTTP_X_HTTP_METHOD_OVERRIDE",
        "HTTP_X_METHOD_OVERRIDE",
        "HTTP_X_HTTP_METHOD",
        "HTTP_X_ORIGINAL_URL",
        "HTTP_X_REWRITE_URL",
        "HTTP_X_REAL_IP",
        "HTTP_TRUE_CLIENT_IP",
        "HTTP_X_CLIENT_IP",
    ):
        assert name not in environ, name
    assert environ["REQUEST_METHOD"] == "GET"


async def test_the_forwarded_host_is_the_configured_one(
    make_proxy: ProxyFactory, wsgi: Wsgi, keys: Keys
) -> None:
    proxy = await make_proxy(
        policy=POLICY, upstream_url=wsgi.url, upstream_extra='    forwarded_host: "api.example.com"'
    )
    token = keys.token("alice", act={"sub": "assistant"})
    response = await raw_request(
        proxy.base,
        "GET",
        "/v1/reports",
        [
            ("Authorization", f"Bearer {token}"),
            ("X-Forwarded-Host", "evil.test"),
        ],
    )
    assert response.status == 200
    assert wsgi.environs[0]["HTTP_X_FORWARDED_HOST"] == "api.example.com"
