"""`audit trace`: a task's whole chain read back from the trail, as a tree in time order.

Who started the task, each agent that worked on it, every subtask that names it as its
parent (`parent_task`, from the token), and every action with its decision, rule, policy
version, outcome and cost; approvals with who decided and why. Built from the records the
proxy writes (`decision`, `outcome`, `approval`), from any number of JSONL files (a fleet's,
rotated ones) in any order. Lines that are not JSON objects are skipped: checking the log is
`verify`'s job.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from agentproxy.clock import rfc3339


@dataclass
class TaskNode:
    task: str
    parent: str | None = None
    parent_source: str | None = None  # "token", or "header": the orchestrator's word only
    # Time-ordered: actions, approval events and subtasks.
    events: list[dict[str, Any]] = field(default_factory=list)
    subtasks: list[TaskNode] = field(default_factory=list)

    @property
    def started(self) -> str:
        times = [e["time"] for e in self.events if e.get("time")]
        times += [t.started for t in self.subtasks if t.started]
        return min(times, default="")

    def agents(self) -> list[str]:
        seen = dict.fromkeys(e["agent"] for e in self.events if e.get("agent"))
        return list(seen)

    def cost(self) -> dict[str, float]:
        """What the task and its subtasks cost, by currency (outcomes' costs)."""
        total: dict[str, float] = {}
        for e in self.events:
            cost = e.get("cost")
            if isinstance(cost, dict) and isinstance(cost.get("amount"), int | float):
                currency = str(cost.get("currency") or "")
                total[currency] = total.get(currency, 0.0) + float(cost["amount"])
        for sub in self.subtasks:
            for currency, amount in sub.cost().items():
                total[currency] = total.get(currency, 0.0) + amount
        return total

    def to_json(self) -> dict[str, Any]:
        first = next((e for e in sorted(self.events, key=_when) if e.get("agent")), None)
        return {
            "task": self.task,
            "parent": self.parent,
            "parent_source": self.parent_source,
            "started": self.started or None,
            "started_by": None
            if first is None
            else {"agent": first["agent"], "user": first.get("user")},
            "agents": self.agents(),
            "cost": {k: round(v, 9) for k, v in sorted(self.cost().items())},
            "events": [
                *sorted(
                    [
                        *self.events,
                        *(
                            {"type": "task", "time": t.started, "task": t.task}
                            for t in self.subtasks
                        ),
                    ],
                    key=_when,
                )
            ],
            "subtasks": [t.to_json() for t in sorted(self.subtasks, key=lambda t: t.started)],
        }


def records(files: Sequence[Path]) -> Iterator[dict[str, Any]]:
    """Every JSON object in `files`. Raises OSError if a file cannot be read."""
    for path in files:
        with Path(path).open("rb") as f:
            for line in f:
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    yield record


def task_tree(task: str, trail: Iterable[dict[str, Any]]) -> TaskNode | None:
    """The tree of `task` from the records of `trail`, or None when no record names it."""
    decisions: list[dict[str, Any]] = []
    outcomes: dict[str, dict[str, Any]] = {}
    approvals: list[dict[str, Any]] = []
    for record in trail:
        kind = record.get("kind")
        if kind == "decision" and isinstance(record.get("task"), str):
            decisions.append(record)
        elif kind == "outcome" and isinstance(record.get("decision_id"), str):
            outcomes[record["decision_id"]] = record
        elif kind == "approval" and isinstance(record.get("approval"), dict):
            approvals.append(record)
    parents: dict[str, str | None] = {}
    sources: dict[str, str | None] = {}
    for d in decisions:
        # The first parent a task's records name is its parent, a token's over a header's;
        # a record naming none (a token without parent_task) does not make it a root.
        name, parent = d["task"], d.get("parent_task")
        parents.setdefault(name, None)
        source = d.get("parent_source") or "token"
        if isinstance(parent, str) and (
            parents[name] is None or (sources.get(name) == "header" and source == "token")
        ):
            parents[name], sources[name] = parent, source
    if task not in parents and not any(a["approval"].get("task") == task for a in approvals):
        return None
    children: dict[str, list[str]] = {}
    for child, parent in parents.items():
        if parent is not None and child != parent:
            children.setdefault(parent, []).append(child)
    nodes: dict[str, TaskNode] = {}
    pending = [task]
    while pending:  # breadth first; a task is placed once, so a cycle in the trail ends here
        name = pending.pop(0)
        if name in nodes:
            continue
        nodes[name] = TaskNode(name, parents.get(name), sources.get(name))
        pending.extend(children.get(name, ()))
    for d in decisions:
        node = nodes.get(d["task"])
        if node is not None:
            node.events.append(_action(d, outcomes.get(str(d.get("decision_id")))))
    for a in approvals:
        node = nodes.get(str(a["approval"].get("task")))
        if node is not None:
            node.events.append(_approval(a))
    for name, node in nodes.items():
        node.events.sort(key=_when)
        if name != task and node.parent in nodes:
            nodes[node.parent].subtasks.append(node)
    return nodes[task]


def _action(d: dict[str, Any], outcome: dict[str, Any] | None) -> dict[str, Any]:
    principal: dict[str, Any] = d["principal"] if isinstance(d.get("principal"), dict) else {}
    event: dict[str, Any] = {
        "type": "action",
        "time": d.get("time"),
        "decision_id": d.get("decision_id"),
        "trace_id": d.get("trace_id"),
        "span_id": d.get("span_id"),
        "agent": principal.get("agent"),
        "user": principal.get("user"),
        "chain": principal.get("chain") or [],
        "action": d.get("action"),
        "upstream": d.get("upstream"),
        "effect": d.get("effect"),
        "rule": d.get("rule"),
        "reason": d.get("reason"),
        "policy_version": d.get("policy_version"),
        "enforced": d.get("enforced"),
    }
    refusal = d.get("refusal")
    if outcome is not None:
        event["status"] = outcome.get("status")
        event["latency_ms"] = outcome.get("latency_ms")
        event["cost"] = outcome.get("cost")
        event["approval_id"] = outcome.get("approval_id")
        refusal = outcome.get("refusal") or refusal
    else:
        event["status"] = d.get("status")
        event["cost"] = None
    if isinstance(refusal, dict):
        event["refusal"] = refusal.get("type")
        if refusal.get("approval_id"):
            event["approval_id"] = refusal["approval_id"]
    return event


def _approval(a: dict[str, Any]) -> dict[str, Any]:
    approval = a["approval"]
    event = a.get("event")
    decided = event in ("approved", "denied")
    return {
        "type": "approval",
        "time": a.get("time") or _approval_time(event, approval),
        "event": event,
        "approval_id": a.get("approval_id"),
        "agent": None,  # the approval's agent is the requester, not an actor here
        "requested_by": approval.get("agent"),
        "action": approval.get("action"),
        "rule": a.get("rule"),
        "decided_by": a.get("decided_by") if decided else None,
        "reason": approval.get("decided_reason") if decided else None,
    }


def _approval_time(event: Any, approval: dict[str, Any]) -> str | None:
    """Approval records carry the approval's own times (epoch seconds), not a `time`: when
    it was asked for, decided, or expired (a grant is used after its decision)."""
    at = {"requested": "created", "expired": "expires"}.get(str(event), "decided_at")
    value = approval.get(at)
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    return rfc3339(float(value), 6)


def _when(event: dict[str, Any]) -> str:
    return str(event.get("time") or "")


def render(node: TaskNode) -> str:
    """The tree as text: one line per task, action and approval event."""
    lines: list[str] = []
    _render(node.to_json(), "", lines, top=True)
    return "\n".join(lines)


def _task_line(tree: dict[str, Any]) -> str:
    by = tree.get("started_by") or {}
    who = by.get("agent") or "?"
    if by.get("user"):
        who = f"{by['user']} via {who}"
    cost = ", ".join(f"{amount:g} {currency}".strip() for currency, amount in tree["cost"].items())
    agents = ", ".join(tree["agents"]) or "-"
    return (
        f"task {tree['task']}"
        + (
            f" (subtask of {tree['parent']}"
            + (
                ", per the agent's X-Agentproxy-Parent-Task"
                if tree.get("parent_source") == "header"
                else ""
            )
            + ")"
            if tree.get("parent")
            else ""
        )
        + f"  started {tree['started'] or '?'} by {who}  agents: {agents}"
        + (f"  cost: {cost}" if cost else "")
    )


def _event_line(e: dict[str, Any]) -> str:
    if e["type"] == "approval":
        line = f"{e['time']}  approval {e['approval_id']} {e['event']}"
        if e.get("decided_by"):
            line += f" by {e['decided_by']}"
        if e.get("reason"):
            line += f": {e['reason']}"
        return line + f"  ({e.get('action')}, requested by {e.get('requested_by')})"
    parts = [str(e.get("time")), str(e.get("agent")), str(e.get("action")), str(e.get("effect"))]
    if e.get("rule"):
        parts.append(f"rule {e['rule']}")
    if e.get("policy_version"):
        parts.append(f"policy {e['policy_version']}")
    if e.get("enforced") is False:
        parts.append("shadow")
    if e.get("status") is not None:
        parts.append(f"status {e['status']}")
    if e.get("refusal"):
        parts.append(str(e["refusal"]).rsplit("/", 1)[-1])
    if e.get("approval_id"):
        parts.append(f"approval {e['approval_id']}")
    cost = e.get("cost")
    if isinstance(cost, dict) and cost.get("amount"):
        parts.append(f"cost {cost['amount']:g} {cost.get('currency') or ''}".strip())
    if e.get("trace_id"):
        parts.append(f"trace {e['trace_id']}")
    return "  ".join(parts)


def _render(tree: dict[str, Any], indent: str, lines: list[str], *, top: bool = False) -> None:
    if top:
        lines.append(_task_line(tree))
    subtasks = {t["task"]: t for t in tree["subtasks"]}
    items = tree["events"]
    for i, e in enumerate(items):
        last = i == len(items) - 1
        branch, deeper = ("└─ ", "   ") if last else ("├─ ", "│  ")
        if e["type"] == "task":
            sub = subtasks[e["task"]]
            lines.append(indent + branch + _task_line(sub))
            _render(sub, indent + deeper, lines)
        else:
            lines.append(indent + branch + _event_line(e))
