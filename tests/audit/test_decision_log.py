"""The decision log line: absent facts are absent keys, and its timestamp."""

from __future__ import annotations

import time

import pytest

from agentproxy.audit.decision_log import entry
from agentproxy.clock import rfc3339
from agentproxy.core import Action, Call, Decision, Effect, Principal, TraceContext
from agentproxy.errors import Denied


def call(**fields: object) -> Call:
    base = Call(
        id="d1",
        action=Action("http", "GET", "/v1/x"),
        upstream="hr",
        started=0.0,
        now=1_700_000_000.0,
        trace=TraceContext("a" * 32, "b" * 16),
    )
    for name, value in fields.items():
        setattr(base, name, value)
    return base


def test_a_refused_anonymous_call_has_no_null_members() -> None:
    record = entry(call(refusal=Denied("no"), status=401), 0.0012345, 1_700_000_000.25)
    assert record == {
        "time": "2023-11-14T22:13:20.250Z",
        "decision_id": "d1",
        "trace_id": "a" * 32,
        "span_id": "b" * 16,
        "action": "http:GET /v1/x",
        "upstream": "hr",
        "enforced": True,
        "status": 401,
        "latency_ms": 1.234,
        "refusal": {"type": Denied("no").problem_type, "detail": "no"},
    }
    assert None not in record.values()


def test_an_allowed_call_in_order() -> None:
    decision = Decision(Effect.ALLOW, "read", "ok", "v1", "http:GET /v1/{x}")
    principal = Principal(agent="bot", acting_for="alice", chain=("planner",))
    record = entry(
        call(
            principal=principal,
            decision=decision,
            task="t1",
            parent_task="t0",
            parent_source="token",
            status=200,
            decision_seconds=0.0000123,
            upstream_seconds=0.002,
        ),
        0.003,
        1_700_000_000.0,
    )
    assert list(record) == [
        "time",
        "decision_id",
        "trace_id",
        "span_id",
        "agent",
        "user",
        "chain",
        "task",
        "parent_task",
        "parent_source",
        "action",
        "upstream",
        "effect",
        "rule",
        "reason",
        "enforced",
        "policy_version",
        "status",
        "latency_ms",
        "decision_us",
        "upstream_ms",
    ]
    assert record["chain"] == ["planner"]
    assert record["decision_us"] == 12.3


def test_llm_fields_only_when_known() -> None:
    record = entry(call(action=Action("llm", "chat", "")), 0.001, 1_700_000_000.0)
    assert record["gen_ai.operation.name"] == "chat"
    assert "gen_ai.request.model" not in record
    assert "gen_ai.response.model" not in record


@pytest.mark.parametrize("now", [0.0, 1_700_000_000.9999, 1_700_000_001.0005, 1e9 + 0.5])
def test_timestamp_matches_strftime(now: float) -> None:
    expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
    assert rfc3339(now, 3) == f"{expected}.{int(now % 1 * 1000):03d}Z"
    assert rfc3339(time.time(), 3).endswith("Z")
