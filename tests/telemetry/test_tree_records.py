"""The task tree from records alone (no port): files in any order, a parent named late, a
cycle in the trail, records of other tasks and torn lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from agentproxy.audit.tree import records, render, task_tree


def decision(
    time: str, task: str, agent: str, parent: str | None = None, **more: Any
) -> dict[str, Any]:
    return {
        "kind": "decision",
        "time": time,
        "decision_id": f"d-{time}",
        "principal": {"agent": agent, "user": None, "chain": []},
        "task": task,
        "parent_task": parent,
        "action": more.pop("action", "http:GET /x"),
        "effect": "allow",
        "rule": "r",
        "policy_version": "v1",
        **more,
    }


def test_order_of_files_and_records_does_not_matter(tmp_path: Path) -> None:
    newer, older = tmp_path / "b.jsonl", tmp_path / "a.jsonl"
    older.write_bytes(
        b"".join(
            orjson.dumps(r) + b"\n"
            for r in (
                decision("2026-01-01T00:00:02Z", "child", "worker"),  # names no parent (yet)
                decision("2026-01-01T00:00:01Z", "root", "planner"),
            )
        )
        + b'{"kind": "decision", "torn'
    )
    newer.write_bytes(
        orjson.dumps(decision("2026-01-01T00:00:03Z", "child", "worker", parent="root"))
        + b"\n"
        + orjson.dumps(
            {
                "kind": "outcome",
                "decision_id": "d-2026-01-01T00:00:03Z",
                "status": 201,
                "cost": {"amount": 0.5, "currency": "EUR"},
            }
        )
        + b"\n"
        + orjson.dumps(decision("2026-01-01T00:00:04Z", "elsewhere", "other"))
        + b"\n"
    )
    tree = task_tree("root", records([newer, older]))
    assert tree is not None
    shown = tree.to_json()
    assert shown["started"] == "2026-01-01T00:00:01Z"
    assert [t["task"] for t in shown["subtasks"]] == ["child"]
    child = shown["subtasks"][0]
    assert [e["time"] for e in child["events"]] == ["2026-01-01T00:00:02Z", "2026-01-01T00:00:03Z"]
    assert child["events"][1]["status"] == 201
    assert shown["cost"] == {"EUR": 0.5}
    assert "elsewhere" not in render(tree)


def test_a_cycle_in_the_trail_ends() -> None:
    trail = [
        decision("2026-01-01T00:00:01Z", "a", "x", parent="b"),
        decision("2026-01-01T00:00:02Z", "b", "y", parent="a"),
    ]
    tree = task_tree("a", trail)
    assert tree is not None
    assert [t.task for t in tree.subtasks] == ["b"]
    assert tree.subtasks[0].subtasks == []  # a is not placed twice
    assert task_tree("c", trail) is None


def test_a_token_named_parent_wins_over_a_header_named_one() -> None:
    trail = [
        decision("2026-01-01T00:00:01Z", "root", "planner"),
        decision("2026-01-01T00:00:02Z", "other", "planner"),
        decision("2026-01-01T00:00:03Z", "sub", "worker", parent="other", parent_source="header"),
        decision("2026-01-01T00:00:04Z", "sub", "worker", parent="root", parent_source="token"),
    ]
    root = task_tree("root", trail)
    assert root is not None and [t.task for t in root.subtasks] == ["sub"]
    assert root.subtasks[0].parent_source == "token"
    only_header = task_tree("other", trail[:3])
    assert only_header is not None
    (sub,) = only_header.subtasks
    assert sub.parent_source == "header"
    assert "per the agent's X-Agentproxy-Parent-Task" in render(only_header)
