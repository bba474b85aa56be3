"""Policy end to end through a real proxy: effects, CEL, delegation, task ids, context, tracing."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import jwt
import orjson
import pytest

from tests.conftest import Keys, Proxy, ProxyFactory, Upstream
from tests.proxy.conftest import bearer, only_header, raw_request

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


async def call(
    proxy: Proxy,
    token: str,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> tuple[int, str, dict[str, Any]]:
    """Status, content type and JSON body of one call through the proxy."""
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, proxy.base + path, headers={**bearer(token), **(headers or {})}) as r,
    ):
        body = orjson.loads(await r.read())
        assert isinstance(body, dict)
        return r.status, r.content_type, body


async def test_allow_forwards_the_exact_path(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    status, _, body = await call(proxy, keys.token(), "/v1/employees/42")
    assert status == 200
    assert body == {"path": "/v1/employees/42", "method": "GET", "bytes": 0}
    assert [s.path for s in upstream.seen] == ["/v1/employees/42"]


async def test_deny_rule_names_rule_and_reason(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    status, ctype, body = await call(proxy, keys.token(), "/v1/employees/7/salary")
    assert status == 403
    assert ctype == "application/problem+json"
    assert body["type"].endswith("/denied")
    assert body["status"] == 403
    assert body["rule"] == "no-salaries"
    assert body["detail"] == "salaries are out of bounds for agents"
    assert re.fullmatch(r"[0-9a-f]{24}", body["decision_id"])
    assert upstream.seen == []


async def test_default_deny_has_no_rule(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    status, ctype, body = await call(proxy, keys.token("stranger"), "/v1/employees/42")
    assert status == 403
    assert ctype == "application/problem+json"
    assert "rule" not in body
    assert "http:GET /v1/employees/42" in body["detail"]
    assert upstream.seen == []


async def test_deny_overrides_a_broader_allow(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    ops = keys.token("ops-bot", roles=["ops"])
    status, _, _ = await call(proxy, ops, "/v1/anything/at/all", method="DELETE")
    assert status == 200
    status, _, body = await call(proxy, ops, "/v1/employees/7/salary")
    assert status == 403
    assert body["rule"] == "no-salaries"
    assert [s.path for s in upstream.seen] == ["/v1/anything/at/all"]


@pytest.mark.parametrize(("employee", "expected"), [("13", 403), ("42", 200), ("130", 200)])
async def test_cel_on_path_parameter(
    proxy: Proxy, upstream: Upstream, keys: Keys, employee: str, expected: int
) -> None:
    status, _, _ = await call(proxy, keys.token(), f"/v1/employees/{employee}")
    assert status == expected
    assert len(upstream.seen) == (1 if expected == 200 else 0)


async def test_cel_on_claims_allows_hr(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    status, _, _ = await call(proxy, keys.token(dept="hr"), "/v1/employees", method="POST")
    assert status == 200
    assert upstream.seen[0].method == "POST"


async def test_cel_on_claims_false_is_default_deny(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    status, _, body = await call(proxy, keys.token(dept="sales"), "/v1/employees", method="POST")
    assert status == 403
    assert "rule" not in body
    assert upstream.seen == []


async def test_cel_error_on_missing_claim_denies_by_that_rule(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    # No `dept` claim: the condition cannot be evaluated, which must deny (never "no match"
    # that another rule could turn into an allow), attributed to the rule whose condition broke.
    status, _, body = await call(proxy, keys.token(), "/v1/employees", method="POST")
    assert status == 403
    assert body["rule"] == "hr-writes"
    assert upstream.seen == []


async def test_on_behalf_of_user(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    token = keys.token("alice", act={"sub": "assistant"})
    status, _, _ = await call(proxy, token, "/v1/me/profile")
    assert status == 200
    seen = upstream.seen[0]
    assert only_header(seen, "X-Agentproxy-User") == "alice"
    assert only_header(seen, "X-Agentproxy-Agent") == "assistant"
    assert "x-agentproxy-chain" not in {k.lower() for k, _ in seen.header_list}


async def test_three_level_chain(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    token = keys.token("alice", act={"sub": "assistant", "act": {"sub": "planner"}})
    status, _, _ = await call(proxy, token, "/v1/me/profile")
    assert status == 200
    seen = upstream.seen[0]
    assert only_header(seen, "X-Agentproxy-Agent") == "assistant"
    assert only_header(seen, "X-Agentproxy-User") == "alice"
    assert only_header(seen, "X-Agentproxy-Chain") == "planner"


@pytest.mark.parametrize(("user", "expected"), [("bob", 403), ("team-x", 200)])
async def test_users_matched_by_id_and_glob(
    proxy: Proxy, upstream: Upstream, keys: Keys, user: str, expected: int
) -> None:
    status, _, _ = await call(proxy, keys.token(user, act={"sub": "assistant"}), "/v1/me/profile")
    assert status == expected
    assert len(upstream.seen) == (1 if expected == 200 else 0)


async def test_agent_without_user_does_not_match_user_rule(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    # The on-behalf rule names users: the assistant acting for nobody is not covered.
    status, _, _ = await call(proxy, keys.token("assistant"), "/v1/me/profile")
    assert status == 403
    assert upstream.seen == []


async def test_task_claim_wins_over_header(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    token = keys.token(task="claimed-task")
    status, _, _ = await call(
        proxy, token, "/v1/employees/42", headers={"X-Agentproxy-Task": "declared"}
    )
    assert status == 200
    assert only_header(upstream.seen[0], "X-Agentproxy-Task") == "claimed-task"


async def test_task_header_alone_sets_task(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    status, _, _ = await call(
        proxy, keys.token(), "/v1/employees/42", headers={"X-Agentproxy-Task": "ticket:42.a_b-c"}
    )
    assert status == 200
    assert only_header(upstream.seen[0], "X-Agentproxy-Task") == "ticket:42.a_b-c"


async def test_no_task_means_no_task_header(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    status, _, _ = await call(proxy, keys.token(), "/v1/employees/42")
    assert status == 200
    assert "x-agentproxy-task" not in {k.lower() for k, _ in upstream.seen[0].header_list}


@pytest.mark.parametrize("value", ["a b", "x" * 129, "x" * 200, "t/1", "é"])
async def test_invalid_task_header_is_400(
    proxy: Proxy, upstream: Upstream, keys: Keys, value: str
) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            proxy.base + "/v1/employees/42",
            headers={**bearer(keys.token()), "X-Agentproxy-Task": value},
        ) as r,
    ):
        assert r.status == 400
        assert r.content_type == "application/problem+json"
        body = orjson.loads(await r.read())
    assert body["status"] == 400
    assert body["decision_id"]
    assert upstream.seen == []


async def test_context_token_verifies_with_published_jwks(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    token = keys.token("alice", act={"sub": "assistant", "act": {"sub": "planner"}}, task="t-1")
    status, _, _ = await call(proxy, token, "/v1/me/profile")
    assert status == 200
    context = only_header(upstream.seen[0], "X-Agentproxy-Context")
    assert context != token
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy.admin + "/.well-known/jwks.json") as r,
    ):
        assert r.status == 200
        jwks = await r.json()
    key = jwt.PyJWK(jwks["keys"][0])
    header = jwt.get_unverified_header(context)
    assert header["kid"] == jwks["keys"][0]["kid"]
    claims = jwt.decode(
        context, key, algorithms=[jwks["keys"][0]["alg"]], audience="tools", issuer="agentproxy"
    )
    assert claims["agent"] == "assistant"
    assert claims["user"] == "alice"
    assert claims["chain"] == ["planner"]
    assert claims["task"] == "t-1"
    assert claims["rule"] == "on-behalf"
    assert claims["upstream"] == "tool"
    assert 0 < claims["exp"] - claims["iat"] <= 60
    # A token the issuer did not sign must not verify against that key.
    forged = jwt.encode({"agent": "root", "aud": "tools"}, keys.private, algorithm="RS256")
    with pytest.raises(jwt.PyJWTError):
        jwt.decode(forged, key, algorithms=[jwks["keys"][0]["alg"]], audience="tools")


async def test_context_token_decision_header_matches_call(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    token = keys.token()
    await call(proxy, token, "/v1/employees/42")
    await call(proxy, token, "/v1/employees/42")  # the same call again: its own context
    await call(proxy, token, "/v1/employees/43")
    decisions = [only_header(s, "X-Agentproxy-Decision") for s in upstream.seen]
    assert all(re.fullmatch(r"[0-9a-f]{24}", d) for d in decisions)
    assert len(set(decisions)) == 3
    contexts = [
        jwt.decode(only_header(s, "X-Agentproxy-Context"), options={"verify_signature": False})
        for s in upstream.seen
    ]
    # Each context token names its own call, as the tool received it: the tool can check
    # that the method and path are its request's and refuse a jti it has already seen.
    assert [c["jti"] for c in contexts] == decisions
    assert [c["decision_id"] for c in contexts] == decisions
    assert [(c["htm"], c["htu"]) for c in contexts] == [
        (seen.method, seen.path) for seen in upstream.seen
    ]
    assert contexts[0]["action"] == "http:GET /v1/employees/42"


async def test_inbound_traceparent_is_continued(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    await call(
        proxy,
        keys.token(),
        "/v1/employees/42",
        headers={"traceparent": f"00-{trace_id}-{parent_id}-01", "tracestate": "vendor=1"},
    )
    match = TRACEPARENT.fullmatch(only_header(upstream.seen[0], "traceparent"))
    assert match is not None
    assert match[1] == trace_id
    assert match[2] != parent_id
    assert match[3] == "01"
    assert only_header(upstream.seen[0], "tracestate") == "vendor=1"


@pytest.mark.parametrize(
    "inbound",
    [
        "garbage",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ],
)
async def test_invalid_traceparent_is_replaced(
    proxy: Proxy, upstream: Upstream, keys: Keys, inbound: str
) -> None:
    await call(
        proxy,
        keys.token(),
        "/v1/employees/42",
        headers={"traceparent": inbound, "tracestate": "vendor=1"},
    )
    value = only_header(upstream.seen[0], "traceparent")
    match = TRACEPARENT.fullmatch(value)
    assert match is not None
    assert match[1] != "0" * 32
    assert match[1] not in inbound.lower()
    assert match[2] != "0" * 16
    # tracestate is meaningless without the traceparent it belonged to (W3C §3.3).
    assert "tracestate" not in {k.lower() for k, _ in upstream.seen[0].header_list}


async def test_missing_traceparent_starts_a_trace(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    await call(proxy, keys.token(), "/v1/employees/42")
    await call(proxy, keys.token(), "/v1/employees/42")
    traces = [only_header(s, "traceparent") for s in upstream.seen]
    assert all(TRACEPARENT.fullmatch(t) for t in traces)
    assert traces[0][3:35] != traces[1][3:35]


async def test_policy_from_custom_file(
    make_proxy: ProxyFactory, upstream: Upstream, keys: Keys
) -> None:
    proxy = await make_proxy(
        policy="""
default: deny
rules:
  - id: query-cel
    agents: ["*"]
    actions: ["http:GET /v1/search"]
    when: 'resource.query.q == "ok"'
    effect: allow
"""
    )
    assert (await call(proxy, keys.token(), "/v1/search?q=ok"))[0] == 200
    assert (await call(proxy, keys.token(), "/v1/search?q=no"))[0] == 403
    # Parameter pollution: a repeated name is a list, so `== "ok"` cannot hold.
    assert (await call(proxy, keys.token(), "/v1/search?q=ok&q=no"))[0] == 403
    assert [s.path for s in upstream.seen] == ["/v1/search?q=ok"]


@pytest.mark.parametrize(
    "target",
    [
        "/v1/employees/%31%33",
        "/v1/employees/x/../13",
        "/v1/employees/7/%73alary",
        "/v1//employees/7/salary",
    ],
)
async def test_encodings_cannot_dodge_conditions_or_denies(
    proxy: Proxy, upstream: Upstream, keys: Keys, target: str
) -> None:
    # "%31%33" is "13" and "%73alary" is "salary" (RFC 3986 §2.3): the condition on the id
    # and the salary deny must see the decoded, normalized path.
    response = await raw_request(
        proxy.base, "GET", target, [("Authorization", f"Bearer {keys.token()}")]
    )
    assert response.status == 403
    assert upstream.seen == []
