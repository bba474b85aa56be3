"""Shadow mode, the decision log and the admin listener (metrics, health, readiness)."""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import UPSTREAM_SECRET, Keys, Proxy, ProxyFactory, Upstream
from tests.proxy.conftest import (
    bearer,
    captured,
    closed_port,
    log_records,
    only_header,
    record_for,
)

SHADOW_RULE_POLICY = """
default: deny
rules:
  - id: read-all
    agents: ["*"]
    actions: ["http:GET /v1/**"]
    effect: allow
    reason: reads are open
  - id: lock-reports
    agents: ["*"]
    actions: ["http:GET /v1/reports/{quarter}"]
    effect: deny
    mode: shadow
    reason: reports are being locked down
"""


async def get(
    base: str, path: str, token: str | None = None, **headers: str
) -> tuple[int, dict[str, Any]]:
    all_headers = {**(bearer(token) if token else {}), **headers}
    async with aiohttp.ClientSession() as s, s.get(base + path, headers=all_headers) as r:
        raw = await r.read()
        return r.status, (orjson.loads(raw) if raw.startswith(b"{") else {})


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample named `name` in a scrape, keyed by its sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def scrape(proxy: Proxy) -> str:
    async with aiohttp.ClientSession() as s, s.get(proxy.admin + "/metrics") as r:
        assert r.status == 200
        return await r.text()


async def test_global_shadow_mode_lets_a_deny_through(
    make_proxy: ProxyFactory, upstream: Upstream, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = await make_proxy(mode="shadow")
    status, _ = await get(proxy.base, "/v1/employees/13", keys.token())
    assert status == 200
    assert [s.path for s in upstream.seen] == ["/v1/employees/13"]
    record = record_for(
        log_records(captured(capsys, proxy)[0]),
        only_header(upstream.seen[0], "X-Agentproxy-Decision"),
    )
    assert record["effect"] == "deny"
    assert record["enforced"] is False
    assert "rule" not in record
    assert record["action"] == "http:GET /v1/employees/13"
    shadow = samples(await scrape(proxy), "agentproxy_shadow_decisions_total")
    assert sum(v for labels, v in shadow.items() if ("decision", "deny") in labels) == 1


async def test_global_shadow_mode_still_authenticates(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    # Shadow mode relaxes policy, never identity: a missing token is still a 401.
    proxy = await make_proxy(mode="shadow")
    status, _ = await get(proxy.base, "/v1/employees/13")
    assert status == 401
    assert upstream.seen == []


async def test_shadow_rule_reports_what_it_would_deny(
    make_proxy: ProxyFactory, upstream: Upstream, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = await make_proxy(policy=SHADOW_RULE_POLICY)
    status, _ = await get(proxy.base, "/v1/reports/q3", keys.token())
    assert status == 200
    status, _ = await get(proxy.base, "/v1/other", keys.token())
    assert status == 200
    records = log_records(captured(capsys, proxy)[0])
    reports = record_for(records, only_header(upstream.seen[0], "X-Agentproxy-Decision"))
    assert reports["effect"] == "allow"
    assert reports["rule"] == "read-all"
    assert reports["enforced"] is True
    assert reports["shadow"] == {"effect": "deny", "rule": "lock-reports"}
    other = record_for(records, only_header(upstream.seen[1], "X-Agentproxy-Decision"))
    assert "shadow" not in other
    shadow = samples(await scrape(proxy), "agentproxy_shadow_decisions_total")
    assert [(dict(labels), value) for labels, value in shadow.items()] == [
        ({"action": "http:GET /v1/**", "decision": "deny", "rule": "lock-reports"}, 1.0)
    ]


async def test_shadow_allow_rule_does_not_open_a_denied_call(
    make_proxy: ProxyFactory, upstream: Upstream, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = await make_proxy(
        policy="""
default: deny
rules:
  - id: trial-admin
    agents: ["*"]
    actions: ["http:GET /admin/**"]
    effect: allow
    mode: shadow
"""
    )
    status, problem = await get(proxy.base, "/admin/users", keys.token())
    assert status == 403
    assert "rule" not in problem
    assert upstream.seen == []
    record = record_for(log_records(captured(capsys, proxy)[0]), problem["decision_id"])
    assert record["effect"] == "deny"
    assert record["enforced"] is True
    assert record["shadow"] == {"effect": "allow", "rule": "trial-admin"}


async def test_decision_log_covers_every_path(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    keys: Keys,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await make_proxy()
    dead = await make_proxy(upstream_url=f"http://127.0.0.1:{closed_port()}")
    token = keys.token()

    status, _ = await get(proxy.base, "/v1/employees/42", token)
    assert status == 200
    allow_id = only_header(upstream.seen[0], "X-Agentproxy-Decision")
    status, deny = await get(proxy.base, "/v1/employees/7/salary", token)
    assert status == 403
    status, default_deny = await get(proxy.base, "/v1/employees/42", keys.token("stranger"))
    assert status == 403
    status, unauthenticated = await get(proxy.base, "/v1/employees/42", "not-a-jwt")
    assert status == 401
    status, bad = await get(proxy.base, "/public/%2Fadmin", token)
    assert status == 400
    status, failed = await get(dead.base, "/public/x", token)
    assert status == 502

    out, err = captured(capsys, proxy, dead)
    records = log_records(out)
    assert len(records) == 6

    allow = record_for(records, allow_id)
    assert allow["agent"] == "hr-bot"
    assert allow["action"] == "http:GET /v1/employees/42"
    assert allow["effect"] == "allow"
    assert allow["rule"] == "read-employees"
    assert allow["reason"] == "HR reads employee records"
    assert allow["status"] == 200
    assert allow["enforced"] is True

    denied = record_for(records, deny["decision_id"])
    assert denied["agent"] == "hr-bot"
    assert denied["action"] == "http:GET /v1/employees/7/salary"
    assert denied["effect"] == "deny"
    assert denied["rule"] == "no-salaries"
    assert denied["reason"] == "salaries are out of bounds for agents"
    assert denied["status"] == 403

    fallback = record_for(records, default_deny["decision_id"])
    assert fallback["agent"] == "stranger"
    assert fallback["effect"] == "deny"
    assert "rule" not in fallback
    assert "no rule allows" in fallback["reason"]

    unauth = record_for(records, unauthenticated["decision_id"])
    assert unauth["status"] == 401
    assert unauth["action"] == "http:GET /v1/employees/42"
    assert unauth["refusal"]["type"].endswith("/unauthenticated")

    refused = record_for(records, bad["decision_id"])
    assert refused["status"] == 400
    assert refused["refusal"]["type"].endswith("/bad-request")

    upstream_failed = record_for(records, failed["decision_id"])
    assert upstream_failed["status"] == 502
    assert upstream_failed["effect"] == "allow"
    assert upstream_failed["rule"] == "public"

    for record in records:
        assert isinstance(record["latency_ms"], float | int)
        assert record["latency_ms"] >= 0
        assert record["time"].endswith("Z")
        assert len(record["trace_id"]) == 32
    logs = out + err + caplog.text
    assert UPSTREAM_SECRET not in logs
    for part in token.split("."):
        assert part not in logs


async def test_metrics_count_by_pattern_and_decision(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    token = keys.token()
    for path in ("/v1/employees/42", "/v1/employees/43"):
        assert (await get(proxy.base, path, token))[0] == 200
    assert (await get(proxy.base, "/v1/employees/7/salary", token))[0] == 403
    assert (await get(proxy.base, "/v1/employees/42"))[0] == 401
    assert (await get(proxy.base, "/v1/employees/42", "a.b.c"))[0] == 401

    text = await scrape(proxy)
    requests = {
        tuple(v for _, v in labels): value
        for labels, value in samples(text, "agentproxy_requests_total").items()
    }
    # Sorted label order: action, decision, upstream.
    assert requests[("http:GET /v1/employees/{id}", "allow", "tool")] == 2
    assert requests[("http:* /v1/employees/{id}/salary", "deny", "tool")] == 1
    assert requests[("other", "unauthenticated", "tool")] == 2
    # Concrete paths never become label values: callers cannot mint time series.
    assert "/v1/employees/42" not in text
    assert "/v1/employees/43" not in text

    for histogram in (
        "agentproxy_decision_seconds",
        "agentproxy_upstream_seconds",
        "agentproxy_request_seconds",
    ):
        counts = samples(text, histogram + "_count")
        assert sum(counts.values()) >= 2, histogram
        assert samples(text, histogram + "_bucket"), histogram
    assert samples(text, "agentproxy_policy_reloads_total")[(("result", "success"),)] == 1


async def test_promtool_finds_nothing_to_complain_about(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: install Debian's `prometheus` package")
    token = keys.token("alice", act={"sub": "assistant"})
    assert (await get(proxy.base, "/v1/me/x", token))[0] == 200
    assert (await get(proxy.base, "/v1/employees/7/salary", keys.token()))[0] == 403
    assert (await get(proxy.base, "/v1/employees/7"))[0] == 401
    text = await scrape(proxy)
    process = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate(text.encode())
    assert process.returncode == 0, output.decode()
    assert output.decode().strip() == ""


async def test_health_and_readiness(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as s:
        for path in ("/healthz", "/readyz"):
            async with s.get(proxy.admin + path) as r:
                assert r.status == 200, path
        # The probes live on the admin listener only; the data plane treats them as calls.
        async with s.get(proxy.base + "/healthz") as r:
            assert r.status == 401
