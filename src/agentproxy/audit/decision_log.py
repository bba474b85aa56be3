"""The JSON decision log: one line per call, on every path, never a token or a secret.

This is the operator's log (stdout for cluster log shippers); the tamper-evident audit trail
is a separate sink.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, BinaryIO

import orjson

from agentproxy.clock import SYSTEM, Clock, rfc3339
from agentproxy.core import Call

log = logging.getLogger("agentproxy.decision_log")


class DecisionLog:
    """Lines are gathered and written together: at most `FLUSH_AFTER` seconds or
    `FLUSH_LINES` lines late, so that a busy proxy does not make a system call per call."""

    FLUSH_AFTER = 0.05
    FLUSH_LINES = 256

    def __init__(
        self, target: str, stream: BinaryIO | None = None, *, clock: Clock = SYSTEM
    ) -> None:
        self._clock = clock
        self._out: BinaryIO | None = stream or {
            "stdout": sys.stdout.buffer,
            "stderr": sys.stderr.buffer,
        }.get(target)
        self._pending: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None

    def write(self, call: Call, latency: float) -> None:
        if self._out is None:
            return
        self._pending.append(
            orjson.dumps(entry(call, latency, self._clock.now()), option=orjson.OPT_APPEND_NEWLINE)
        )
        if len(self._pending) >= self.FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self.FLUSH_AFTER, self.flush)
            except RuntimeError:  # no loop (a CLI command): write now
                self.flush()

    def write_event(self, record: dict[str, Any]) -> None:
        """A line that is not a call (an approval event)."""
        if self._out is None:
            return
        self._pending.append(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._out is None or not self._pending:
            return
        lines, self._pending = self._pending, []
        try:
            self._out.write(b"".join(lines))
            self._out.flush()
        except (OSError, ValueError) as exc:
            # The operator's log must not take calls down with it; say so on stderr.
            log.error("decision log: %d line(s) lost: %s", len(lines), exc)


def entry(call: Call, latency: float, now: float) -> dict[str, Any]:
    """The log record of a finished call. Built from the Call's fields only: no headers, no body.

    Absent facts are absent keys (never null). Runs once per call, so the record is built
    with only what is present instead of filtered afterwards.
    """
    p = call.principal
    d = call.decision
    record: dict[str, Any] = {
        "time": rfc3339(now, 3),
        "decision_id": call.id,
        "trace_id": call.trace.trace_id,
        "span_id": call.trace.span_id,
    }
    if p is not None:
        record["agent"] = p.agent
        if p.acting_for is not None:
            record["user"] = p.acting_for
        if p.chain:
            record["chain"] = list(p.chain)
    if call.task is not None:
        record["task"] = call.task
    if call.parent_task is not None:
        record["parent_task"] = call.parent_task
        record["parent_source"] = call.parent_source
    if call.session is not None:
        record["session"] = call.session
    record["action"] = call.action.name
    record["upstream"] = call.upstream
    if d is not None:
        record["effect"] = d.effect.value
        if d.rule_id is not None:
            record["rule"] = d.rule_id
        record["reason"] = d.reason
    record["enforced"] = call.enforced
    if d is not None:
        record["policy_version"] = d.policy_version
    if call.status is not None:
        record["status"] = call.status
    record["latency_ms"] = round(latency * 1000, 3)
    if d is not None and d.shadow_effect is not None:
        record["shadow"] = {"effect": d.shadow_effect.value, "rule": d.shadow_rule}
    if call.refusal is not None:
        record["refusal"] = {"type": call.refusal.problem_type, "detail": call.refusal.detail}
    if call.error is not None:
        record["error"] = call.error
    if call.decision_seconds is not None:
        record["decision_us"] = round(call.decision_seconds * 1e6, 1)
    if call.upstream_seconds is not None:
        record["upstream_ms"] = round(call.upstream_seconds * 1000, 3)
    if call.cost:
        record["cost"] = {"amount": round(call.cost, 9), "currency": call.currency}
    if call.shaped is not None:
        rules, fields, items = call.shaped
        record["shaped"] = {"rules": list(rules), "fields_removed": fields, "items_removed": items}
    if call.grpc_status is not None:
        record["rpc.grpc.status_code"] = call.grpc_status  # OpenTelemetry's name
    if call.action.protocol == "llm":
        # OpenTelemetry GenAI semantic conventions, for trace pipelines that read this log.
        record["gen_ai.operation.name"] = call.action.operation
        if call.action.target:
            record["gen_ai.request.model"] = call.action.target
        if call.model is not None:
            record["gen_ai.response.model"] = call.model
        if call.tokens is not None:
            record["gen_ai.usage.input_tokens"] = call.tokens[0] + call.tokens[2]
            record["gen_ai.usage.output_tokens"] = call.tokens[1]
            # Of the input, what the provider's cache served (priced at the cached rate).
            record["gen_ai.usage.cache_read.input_tokens"] = call.tokens[2]
    return record
