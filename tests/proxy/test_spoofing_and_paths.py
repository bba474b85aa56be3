"""Header spoofing and path tricks: the upstream sees only the proxy's identity headers, its own
credential, and exactly the path the policy matched.

Requests here go over a raw socket so that no client library normalizes the path or headers.
"""

from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import UPSTREAM_SECRET, Keys, Proxy, Upstream
from tests.proxy.conftest import header_values, only_header, raw_request

SPOOFED = [
    ("X-Agentproxy-Agent", "root"),
    ("x-AgentProxy-Agent", "root2"),
    ("X-Agentproxy-User", "ceo"),
    ("X-AGENTPROXY-USER", "ceo2"),
    ("X-Agentproxy-Chain", "admin"),
    ("X-Agentproxy-Decision", "000000000000000000000000"),
    ("X-Agentproxy-Context", "eyJhbGciOiJub25lIn0.eyJhZ2VudCI6InJvb3QifQ."),
    ("x-agentproxy-context", "forged"),
    ("X-Agentproxy-Rule", "everything"),
    ("X-Agentproxy-Whatever", "x"),
]


async def test_spoofed_identity_headers_are_replaced(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    token = keys.token(task="real-task")
    response = await raw_request(
        proxy.base,
        "GET",
        "/v1/employees/42",
        [("Authorization", f"Bearer {token}"), *SPOOFED, ("X-Agentproxy-Task", "spoofed")],
    )
    assert response.status == 200
    seen = upstream.seen[0]
    assert only_header(seen, "X-Agentproxy-Agent") == "hr-bot"
    assert only_header(seen, "X-Agentproxy-Task") == "real-task"
    assert len(only_header(seen, "X-Agentproxy-Decision")) == 24
    assert only_header(seen, "X-Agentproxy-Decision") != "0" * 24
    context = only_header(seen, "X-Agentproxy-Context")
    assert context not in {value for _, value in SPOOFED}
    # Absent facts are absent headers, not the agent's values.
    for name in (
        "X-Agentproxy-User",
        "X-Agentproxy-Chain",
        "X-Agentproxy-Rule",
        "X-Agentproxy-Whatever",
    ):
        assert header_values(seen, name) == []
    received = {value for _, value in seen.header_list}
    for _, value in SPOOFED:
        assert value not in received


async def test_spoofed_user_and_chain_replaced_on_delegation(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    token = keys.token("alice", act={"sub": "assistant", "act": {"sub": "planner"}})
    response = await raw_request(
        proxy.base,
        "GET",
        "/v1/me/x",
        [
            ("Authorization", f"Bearer {token}"),
            ("X-Agentproxy-User", "team-admin"),
            ("x-agentproxy-chain", "root"),
        ],
    )
    assert response.status == 200
    seen = upstream.seen[0]
    assert only_header(seen, "X-Agentproxy-User") == "alice"
    assert only_header(seen, "X-Agentproxy-Chain") == "planner"


async def test_spoofed_headers_do_not_influence_policy(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    # A stranger claiming to be hr-bot in a header stays a stranger.
    response = await raw_request(
        proxy.base,
        "GET",
        "/v1/employees/42",
        [
            ("Authorization", f"Bearer {keys.token('stranger')}"),
            ("X-Agentproxy-Agent", "hr-bot"),
        ],
    )
    assert response.status == 403
    assert upstream.seen == []


async def test_authorization_never_forwarded(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    token = keys.token()
    response = await raw_request(
        proxy.base,
        "GET",
        "/v1/employees/42",
        [
            ("authorization", f"Bearer {token}"),
        ],
    )
    assert response.status == 200
    seen = upstream.seen[0]
    assert header_values(seen, "Authorization") == []
    assert all(token not in value for _, value in seen.header_list)


async def test_agent_supplied_credential_is_replaced(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    response = await raw_request(
        proxy.base,
        "GET",
        "/v1/employees/42",
        [
            ("Authorization", f"Bearer {keys.token()}"),
            ("X-Api-Key", "agent-chosen-key"),
            ("x-api-key", "another-one"),
        ],
    )
    assert response.status == 200
    assert only_header(upstream.seen[0], "X-Api-Key") == UPSTREAM_SECRET


async def test_connection_header_cannot_drop_injected_credential(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    response = await raw_request(
        proxy.base,
        "GET",
        "/v1/employees/42",
        [
            ("Authorization", f"Bearer {keys.token()}"),
            (
                "Connection",
                "close, X-Api-Key, X-Agentproxy-Agent, X-Agentproxy-Context, traceparent",
            ),
        ],
    )
    assert response.status == 200
    seen = upstream.seen[0]
    assert only_header(seen, "X-Api-Key") == UPSTREAM_SECRET
    assert only_header(seen, "X-Agentproxy-Agent") == "hr-bot"
    assert only_header(seen, "X-Agentproxy-Context")
    assert only_header(seen, "traceparent")


async def test_hop_by_hop_headers_not_forwarded(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    response = await raw_request(
        proxy.base,
        "GET",
        "/v1/employees/42",
        [
            ("Authorization", f"Bearer {keys.token()}"),
            ("Connection", "close, X-Custom-Hop"),
            ("X-Custom-Hop", "named-by-connection"),
            ("Keep-Alive", "timeout=99"),
            ("TE", "trailers"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
            ("Proxy-Connection", "keep-alive"),
            ("X-End-To-End", "kept"),
        ],
    )
    assert response.status == 200
    seen = upstream.seen[0]
    for name in (
        "Keep-Alive",
        "TE",
        "Upgrade",
        "Proxy-Authorization",
        "Proxy-Connection",
        "X-Custom-Hop",
    ):
        assert header_values(seen, name) == [], name
    for value in header_values(seen, "Connection"):
        assert "x-custom-hop" not in value.lower()
        assert "close" not in value.lower()
    assert only_header(seen, "X-End-To-End") == "kept"
    # Host names the upstream the proxy chose, not the one the agent addressed.
    assert only_header(seen, "Host") == upstream.url.removeprefix("http://")


async def test_identifiers_are_encoded_to_stay_one_list_item(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    # A comma in a subject must not add a second item to X-Agentproxy-Chain-style lists.
    token = keys.token("alice, root", act={"sub": "assistant", "act": {"sub": "plan,ner"}})
    response = await raw_request(
        proxy.base,
        "GET",
        "/public/x",
        [
            ("Authorization", f"Bearer {token}"),
        ],
    )
    assert response.status == 200
    seen = upstream.seen[0]
    assert only_header(seen, "X-Agentproxy-User") == "alice%2C%20root"
    assert only_header(seen, "X-Agentproxy-Chain") == "plan%2Cner"


async def test_forwarded_headers_are_the_proxy_s_own(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    response = await raw_request(
        proxy.base,
        "GET",
        "/v1/employees/42",
        [
            ("Authorization", f"Bearer {keys.token()}"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("Forwarded", "for=10.0.0.3"),
            ("X-Forwarded-Host", "evil.test"),
            ("X-Forwarded-Proto", "https"),
        ],
    )
    assert response.status == 200
    seen = upstream.seen[0]
    assert only_header(seen, "X-Forwarded-For") == "127.0.0.1"
    assert only_header(seen, "X-Forwarded-Proto") == "http"
    assert header_values(seen, "X-Forwarded-Host") == []  # only a configured forwarded_host
    assert header_values(seen, "Forwarded") == []


# --- paths ------------------------------------------------------------------------------------
# The default policy allows `http:GET /public/**` to everyone; "nobody" has no other rule.


@pytest.mark.parametrize(
    ("target", "normalized"),
    [
        ("/public/../v1/employees/1", "/v1/employees/1"),
        ("/public/%2e%2e/v1/employees/1", "/v1/employees/1"),
        ("/public/%2E%2E/v1/employees/1", "/v1/employees/1"),
        ("/public/.%2e/v1/employees/1", "/v1/employees/1"),
        ("/public/x/../../admin", "/admin"),
        ("/public/../../../../admin", "/admin"),
        ("/PUBLIC/x", "/PUBLIC/x"),
        ("/Public/x", "/Public/x"),
        ("/%70ublic/../admin", "/admin"),
    ],
)
async def test_traversal_is_matched_after_normalization(
    proxy: Proxy, upstream: Upstream, keys: Keys, target: str, normalized: str
) -> None:
    response = await raw_request(
        proxy.base,
        "GET",
        target,
        [
            ("Authorization", f"Bearer {keys.token('nobody')}"),
        ],
    )
    assert response.status == 403
    # The policy judged the normalized path (the default deny names the action it refused).
    assert f"http:GET {normalized} " in response.json()["detail"]
    assert upstream.seen == []


@pytest.mark.parametrize(
    "target",
    [
        "/public/%2F..%2Fadmin",
        "/public/%2f..%2fadmin",
        "/public/x%00",
        "/public/x%5C..%5Cadmin",
        "/public/..;/admin",
        "/public/a;b",
        "/public/a%3Bb",
        "/public/%252e%252e/admin",
        "/public/%252Fadmin",
        "/public/%c0%ae%c0%ae/admin",
        "/public/%ff",
        "/public/%zz",
        "/public/x%",
        "/public/a\\..\\admin",
        "/public/" + "a" * 9000,
    ],
)
async def test_ambiguous_paths_are_400(
    proxy: Proxy, upstream: Upstream, keys: Keys, target: str
) -> None:
    response = await raw_request(
        proxy.base,
        "GET",
        target,
        [
            ("Authorization", f"Bearer {keys.token('nobody')}"),
        ],
    )
    assert response.status == 400
    assert response.header("Content-Type") == "application/problem+json"
    assert response.json()["status"] == 400
    assert upstream.seen == []


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        ("/public/x", "/public/x"),
        ("//public/x", "/public/x"),
        ("/public//x", "/public/x"),
        ("/public/./x", "/public/x"),
        ("/public/y/../x", "/public/x"),
        ("/public/%78", "/public/x"),
        ("/public/caf%c3%a9", "/public/caf%C3%A9"),
        ("/public/a%20b", "/public/a%20b"),
        ("/public/x?q=a%2Fb&r=1", "/public/x?q=a%2Fb&r=1"),
        ("/public/x/", "/public/x/"),
    ],
)
async def test_upstream_receives_exactly_the_matched_path(
    proxy: Proxy, upstream: Upstream, keys: Keys, target: str, forwarded: str
) -> None:
    response = await raw_request(
        proxy.base,
        "GET",
        target,
        [
            ("Authorization", f"Bearer {keys.token('nobody')}"),
        ],
    )
    assert response.status == 200
    assert [s.path for s in upstream.seen] == [forwarded]


@pytest.mark.parametrize("method", ["get", "Get", "POST", "DELETE"])
async def test_methods_are_case_sensitive(
    proxy: Proxy, upstream: Upstream, keys: Keys, method: str
) -> None:
    # RFC 9110 §9.1: "get" is not "GET". aiohttp's parser already refuses lowercase methods
    # (400); any that got through would meet the default deny (403). Neither reaches upstream.
    response = await raw_request(
        proxy.base,
        method,
        "/public/x",
        [
            ("Authorization", f"Bearer {keys.token('nobody')}"),
        ],
    )
    assert response.status in (400, 403)
    assert upstream.seen == []


async def test_encoded_path_via_aiohttp_client(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    from yarl import URL

    async with aiohttp.ClientSession() as s:
        url = URL(proxy.base + "/public/%2e%2e/v1/employees/1", encoded=True)
        headers = {"Authorization": f"Bearer {keys.token('nobody')}"}
        async with s.get(url, headers=headers) as r:
            assert r.status == 403
        url = URL(proxy.base + "/public/%2e/x", encoded=True)
        async with s.get(url, headers=headers) as r:
            assert r.status == 200
    assert [s.path for s in upstream.seen] == ["/public/x"]


async def test_no_log_line_carries_a_query_token_or_the_agents_user_agent(
    caplog: pytest.LogCaptureFixture, proxy: Proxy, keys: Keys
) -> None:
    """aiohttp's access log wrote the full query (an ?access_token= JWT in clear) and the
    User-Agent unescaped; the data plane writes none (the decision log records each call)."""
    import logging

    caplog.set_level(logging.DEBUG)
    token = keys.token()
    async with aiohttp.ClientSession() as s:
        async with s.get(
            f"{proxy.base}/v1/employees/42?access_token={token}",
            headers={"Authorization": f"Bearer {token}", "User-Agent": 'x" 200 0 "forged'},
        ) as r:
            assert r.status == 200
        async with s.get(f"{proxy.base}/v1/employees/13?access_token={token}") as r:
            assert r.status == 401
    # (The decision log names the action, never the query: see test_audit_e2e for redaction.)
    assert token not in caplog.text
    assert "forged" not in caplog.text
    assert not [r for r in caplog.records if r.name == "aiohttp.access"]
