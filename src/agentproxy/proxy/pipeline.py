"""The one pipeline every call walks, whatever its protocol.

    describe → identify → decide → [gate → audit_decision] → forward → [meter] → record

The protocol shell describes the call (builds the `Call`), then hands it here with an
`Exchange`: the shell's way to forward the call or answer a refusal in its own wire format.
The stage order is visible in one place, `run()`; later issues add stages to the list.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from agentproxy.audit.decision_log import DecisionLog
from agentproxy.core import Call, Effect, Facts, Mode
from agentproxy.errors import Denied, InternalError, MissingCredential, Refusal, Unauthenticated
from agentproxy.metering.metrics import Metrics
from agentproxy.policy import decide
from agentproxy.proxy.runtime import Runtime

log = logging.getLogger("agentproxy.pipeline")

Stage = Callable[[Call], Awaitable[None]]


class Exchange(Protocol):
    """The protocol shell of one call."""

    @property
    def responded(self) -> bool:
        """True once anything was sent to the caller (a refusal can no longer be rendered)."""

    async def forward(self, call: Call) -> None:
        """Sends the call upstream and streams the answer back. Raises Refusal before responding."""

    async def refuse(self, call: Call) -> None:
        """Answers `call.refusal` in the protocol's own shape."""


class Pipeline:
    """Built once per runtime snapshot; in-flight calls keep the snapshot they started with."""

    def __init__(self, runtime: Runtime, metrics: Metrics, decision_log: DecisionLog) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.decision_log = decision_log
        self.before_forward: tuple[Stage, ...] = (self.identify, self.decide)

    async def run(self, call: Call, exchange: Exchange) -> None:
        """Walks the call through every stage; records it exactly once, on every path."""
        try:
            try:
                # A call the adapter could not describe arrives already refused.
                if call.refusal is None:
                    for stage in self.before_forward:
                        await stage(call)
                        if call.refusal is not None:
                            break
                    else:
                        await exchange.forward(call)
            except Refusal as refusal:
                call.refusal = refusal
            except asyncio.CancelledError:
                call.error = call.error or "cancelled"
                raise
            except Exception:
                log.exception("bug while handling call %s", call.id)
                call.refusal = InternalError("internal error; the call was not completed")
            if call.refusal is not None and not exchange.responded:
                await exchange.refuse(call)
        finally:
            self.record(call)

    async def identify(self, call: Call) -> None:
        """Verifies the bearer token and settles the task id.

        The task comes from the token's task claim; only if it has none, from the agent's own
        declaration (`X-Agentproxy-Task`), already validated by the protocol adapter.
        """
        started = time.perf_counter()
        if call.bearer is None:
            raise MissingCredential()
        call.principal = await self.runtime.verifier.verify(call.bearer, call.now)
        call.task = call.principal.task or call.declared_task
        call.decision_seconds = time.perf_counter() - started

    async def decide(self, call: Call) -> None:
        if call.principal is None:
            raise Unauthenticated("missing bearer token")
        started = time.perf_counter()
        decision = decide(
            self.runtime.policy, call.action, call.principal, Facts(task_id=call.task), call.now
        )
        call.decision = decision
        call.enforced = self.runtime.config.mode is Mode.ENFORCE
        call.decision_seconds = (call.decision_seconds or 0.0) + time.perf_counter() - started
        if decision.effect is not Effect.ALLOW and call.enforced:
            call.refusal = Denied(decision.reason, rule=decision.rule_id)

    def record(self, call: Call) -> None:
        """Metrics and the decision log line. Never raises: a record failure is logged."""
        try:
            finished = time.perf_counter()
            m = self.metrics
            decision = call.decision
            action = (decision.matched_action if decision else None) or "other"
            m.requests.labels(call.upstream, action, outcome_label(call)).inc()
            if decision is not None:
                if not call.enforced and decision.effect is not Effect.ALLOW:
                    m.shadow_decisions.labels(
                        action, decision.rule_id or "", decision.effect.value
                    ).inc()
                if decision.shadow_effect is not None:
                    m.shadow_decisions.labels(
                        action, decision.shadow_rule or "", decision.shadow_effect.value
                    ).inc()
            if call.decision_seconds is not None:
                m.decision_seconds.observe(call.decision_seconds)
            total = finished - call.started
            m.request_seconds.labels(call.upstream).observe(total)
            if call.upstream_seconds is not None:
                m.upstream_seconds.labels(call.upstream).observe(call.upstream_seconds)
            m.overhead_seconds.observe(max(0.0, total - (call.upstream_seconds or 0.0)))
            self.decision_log.write(call, total)
        except Exception:
            log.exception("failed to record call %s", call.id)


def outcome_label(call: Call) -> str:
    """The `decision` label: the policy's effect, or why no decision was made."""
    if call.decision is not None:
        return call.decision.effect.value
    refusal = call.refusal
    if isinstance(refusal, Unauthenticated):
        return "unauthenticated"
    if refusal is None or refusal.fault == "client":
        return "invalid"
    return "error"
