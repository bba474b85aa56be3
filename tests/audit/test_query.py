"""`query`: filters over JSONL audit files, streamed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from agentproxy.audit.chain import Chain
from agentproxy.audit.query import query

ROWS: list[dict[str, Any]] = [
    {"agent": "hr-bot", "user": "alice", "task": "t1", "action": "http:GET /v1/employees/7",
     "effect": "allow", "time": "2025-03-01T10:00:00Z"},
    {"agent": "hr-bot", "user": "bob", "task": "t1", "action": "http:PUT /v1/employees/7",
     "effect": "deny", "time": "2025-03-01T11:00:00.5+00:00"},
    {"agent": "assistant", "user": "alice", "task": "t2", "action": "mcp:tools/call/pay",
     "effect": "require_approval", "time": "2025-03-01T12:30:00+02:00"},
    {"agent": "assistant", "user": "alice", "task": "t2", "action": "http:GET /v1/me/x",
     "effect": "allow", "time": 1740830400.0},  # 2025-03-01T12:00:00Z as epoch seconds
]  # fmt: skip


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    chain = Chain("r1")
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_bytes(
        b"".join(chain.seal_line({"kind": "decision", **r}).line + b"\n" for r in ROWS[:2])
    )
    checkpoint = {"kind": "checkpoint", "head": chain.head, "signature": "x"}
    rest = [{"kind": "decision", **r} for r in ROWS[2:]]
    second.write_bytes(
        b"".join(chain.seal_line(r).line + b"\n" for r in [checkpoint, *rest])
        + b'{"agent":"hr-bot","kind":"deci'  # an incomplete last line is skipped
    )
    return [first, second]


def agents(rows: Any) -> list[tuple[str, str]]:
    return [(r["agent"], r["user"]) for r in rows]


def test_no_filter_yields_everything_in_file_order(files: list[Path]) -> None:
    assert [r["kind"] for r in query(files)] == ["decision"] * 2 + ["checkpoint"] + ["decision"] * 2


def test_exact_filters(files: list[Path]) -> None:
    assert agents(query(files, agent="hr-bot")) == [("hr-bot", "alice"), ("hr-bot", "bob")]
    assert agents(query(files, user="alice", task="t2")) == [("assistant", "alice")] * 2
    assert [r["effect"] for r in query(files, effect="deny")] == ["deny"]
    assert list(query(files, agent="nobody")) == []


def test_action_is_a_glob(files: list[Path]) -> None:
    assert [r["action"] for r in query(files, action="http:GET *")] == [
        "http:GET /v1/employees/7",
        "http:GET /v1/me/x",
    ]
    assert len(list(query(files, action="mcp:tools/call/*"))) == 1


def test_time_range_takes_datetimes_epochs_and_offsets(files: list[Path]) -> None:
    since = datetime(2025, 3, 1, 10, 30, tzinfo=UTC)
    until = datetime(2025, 3, 1, 12, 0)  # naive: UTC, and the end is excluded
    # 12:30+02:00 is 10:30Z, the start, which is included; the epoch row is 12:00Z, the end
    assert [r["user"] for r in query(files, since=since, until=until)] == ["bob", "alice"]
    from_ten_thirty = query(files, since=since.timestamp(), agent="assistant")
    assert [r["action"] for r in from_ten_thirty] == ["mcp:tools/call/pay", "http:GET /v1/me/x"]
    tz = timezone(timedelta(hours=-5))
    assert len(list(query(files, until=datetime(2025, 3, 1, 5, 0, 1, tzinfo=tz)))) == 1


def test_query_streams(files: list[Path]) -> None:
    rows = query(files, agent="hr-bot")
    assert next(rows)["user"] == "alice"
    files[1].write_bytes(orjson.dumps({"agent": "hr-bot", "user": "late"}) + b"\n")
    assert [r["user"] for r in rows] == ["bob", "late"]  # the second file is opened later
