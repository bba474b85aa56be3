"""The one pipeline every call walks, whatever its protocol.

    describe → identify → decide → [gate → audit_decision] → forward → [meter] → record

The protocol shell describes the call (builds the `Call`), then hands it here with an
`Exchange`: the shell's way to forward the call or answer a refusal in its own wire format.
The stage order is visible in one place, `run()`; later issues add stages to the list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from agentproxy.approvals.lifecycle import Approval, State, fingerprint, summarize
from agentproxy.audit.decision_log import DecisionLog
from agentproxy.audit.records import decision_record, outcome_record
from agentproxy.audit.sinks import AuditError
from agentproxy.audit.trail import AuditTrail
from agentproxy.config.model import ApprovalsSettings
from agentproxy.core import (
    Action,
    Call,
    Decision,
    Effect,
    Facts,
    Mode,
    Principal,
    Reservation,
    plain,
)
from agentproxy.errors import (
    ApprovalCap,
    ApprovalRefused,
    Denied,
    InternalError,
    LimitRefused,
    MissingCredential,
    Refusal,
    Unauthenticated,
    Unavailable,
)
from agentproxy.identity.revocations import RevocationList
from agentproxy.metering.meter import Meter
from agentproxy.metering.metrics import Metrics
from agentproxy.metering.prices import TokenUsage
from agentproxy.policy import decide
from agentproxy.policy.compiler import Rule
from agentproxy.policy.limits import LimitKeyError, reservations, rule_cost
from agentproxy.policy.memo import DecisionMemo, memo_key
from agentproxy.protocols.http import parse_traceparent
from agentproxy.proxy.runtime import Runtime
from agentproxy.store import Store, StoreError

log = logging.getLogger("agentproxy.pipeline")

# How long a call waits for its decision record when `audit.required` (then 503).
AUDIT_WAIT = 2.0

Stage = Callable[[Call, "Exchange"], Awaitable[None]]


class Exchange(Protocol):
    """The protocol shell of one call."""

    @property
    def responded(self) -> bool:
        """True once anything was sent to the caller (a refusal can no longer be rendered)."""

    async def describe(self, call: Call) -> None:
        """Completes `call.action` from what only an authenticated caller may make the proxy
        read (an MCP body: the JSON-RPC message names the tool); a no-op for plain HTTP.
        Raises Refusal for a body that cannot be described unambiguously."""

    async def forward(self, call: Call) -> None:
        """Sends the call upstream and streams the answer back. Raises Refusal before responding."""

    async def refuse(self, call: Call) -> None:
        """Answers `call.refusal` in the protocol's own shape."""


@dataclass(slots=True)
class Services:
    """What outlives a reload: the store and its mirrors, metrics, the decision log."""

    store: Store
    revocations: RevocationList
    metrics: Metrics
    decision_log: DecisionLog
    on_error: str = "deny"
    task_ttl: float = 24 * 3600.0
    audit: AuditTrail | None = None
    audit_required: bool = False
    approvals: ApprovalsSettings = field(default_factory=ApprovalsSettings)
    meter: Meter | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    notify: Callable[[str, Approval], None] | None = None


class Pipeline:
    """Built once per runtime snapshot; in-flight calls keep the snapshot they started with."""

    def __init__(self, runtime: Runtime, services: Services) -> None:
        self.runtime = runtime
        self.services = services
        self.metrics = services.metrics
        self.memo = DecisionMemo()
        self.before_forward: tuple[Stage, ...] = (
            self.identify,
            self.describe,
            self.decide,
            self.gate,
            self.take_limits,
            self.audit_decision,
        )

    async def run(self, call: Call, exchange: Exchange) -> None:
        """Walks the call through every stage; records it exactly once, on every path."""
        try:
            try:
                # A call the adapter could not describe arrives already refused.
                if call.refusal is None:
                    for stage in self.before_forward:
                        await stage(call, exchange)
                        if call.refusal is not None:
                            break
                    else:
                        try:
                            await exchange.forward(call)
                        finally:
                            await self.settle(call)
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
            if call.reservations and call.status is None:
                await self.release(call)
            self.record(call)

    async def identify(self, call: Call, _: Exchange) -> None:
        """Verifies the bearer token, checks the deny list and settles the task id.

        The task comes from the token's task claim; only if it has none, from the agent's own
        declaration (`X-Agentproxy-Task`), already validated by the protocol adapter.
        """
        started = time.perf_counter()
        if call.bearer is None:
            raise MissingCredential()
        principal = await self.runtime.verifier.verify(call.bearer, call.now)
        call.principal = principal
        call.task = principal.task or call.declared_task
        revocations = self.services.revocations
        if not revocations.fresh():
            call.store_error = "revocations could not be refreshed"
        revoked = revocations.check(principal, call.now)
        if revoked is not None:
            until = "" if revoked.until == math.inf else f" until {_iso(revoked.until)}"
            if revoked.kind == "token":
                raise Unauthenticated(f"token revoked{until}")
            raise Denied(
                f"agent {principal.agent} is revoked{until}"
                + (f": {revoked.reason}" if revoked.reason else "")
            )
        call.decision_seconds = time.perf_counter() - started

    async def describe(self, call: Call, exchange: Exchange) -> None:
        await exchange.describe(call)

    async def decide(self, call: Call, _: Exchange) -> None:
        """Decides the call's action, and every other action of a batch (an MCP JSON-RPC
        batch): a batch is forwarded only if every message in it is allowed."""
        principal = call.principal
        if principal is None or call.bearer is None:
            raise MissingCredential()
        started = time.perf_counter()
        facts: Facts | None = None
        decisions: list[Decision] = []
        hits = 0
        for action in (call.action, *call.batch):
            key = memo_key(call.bearer, action)
            decision = self.memo.get(key)
            if decision is not None:
                hits += 1
                self.metrics.decision_cache.labels("hit").inc()
            else:
                self.metrics.decision_cache.labels("miss").inc()
                if facts is None:
                    facts = await self._facts(call)
                decision = decide(self.runtime.policy, action, principal, facts, call.now)
                if decision.memoizable:
                    self.memo.put(key, decision)
            decisions.append(decision)
        call.memo_hit = hits == len(decisions)
        refused = next((i for i, d in enumerate(decisions) if d.effect is not Effect.ALLOW), None)
        call.refused_at = refused
        call.decision = decisions[refused if refused is not None else 0]
        call.enforced = self.runtime.config.mode is Mode.ENFORCE
        call.decision_seconds = (call.decision_seconds or 0.0) + time.perf_counter() - started
        if call.store_error is not None:
            self._degraded(call)
        decision = call.decision
        if decision.effect is Effect.DENY and call.enforced:
            call.refusal = Denied(decision.reason, rule=decision.rule_id)

    async def _facts(self, call: Call) -> Facts:
        if self.runtime.policy.reads_task and call.task is not None:
            return await self._task_facts(call, call.task)
        return Facts(task_id=call.task)

    async def gate(self, call: Call, _: Exchange) -> None:
        """`require_approval`: a stored grant lets the call through; otherwise the pending
        approval for exactly this call is found or created, and the call is held up to the
        rule's `hold` for a decision, then answered approved (forwarded), denied, expired or
        still pending (ask again; the approval id tells which)."""
        decision = call.decision
        principal = call.principal
        if decision is None or decision.effect is not Effect.REQUIRE_APPROVAL:
            return
        if not call.enforced or principal is None or decision.rule_id is None:
            return
        rule = self.runtime.policy.rule(decision.rule_id)
        spec = rule.approval
        if spec is None:
            raise Denied("the rule requires approval but names no approvers", rule=rule.id)
        if call.batch:
            raise Denied(
                "a batch that needs approval cannot be approved; send that call alone", rule=rule.id
            )
        store = self.services.store
        args = plain(call.action.args) if call.action.args is not None else None
        fp = fingerprint(
            principal.agent,
            principal.acting_for,
            principal.chain,
            call.action.name,
            args,
            plain(call.action.query),
        )
        try:
            if await self._use_grant(call, fp):
                return
            now = time.time()
            approval = Approval(
                id=os.urandom(10).hex(),
                fingerprint=fp,
                state=State.PENDING,
                rule=rule.id,
                reason=spec.reason or rule.reason or f"rule {rule.id} requires approval",
                agent=principal.agent,
                user=principal.acting_for,
                chain=principal.chain,
                action=call.action.name,
                summary=summarize(args),
                approvers=spec.approvers,
                created=now,
                expires=now + spec.timeout,
                grant_ttl=spec.grant_ttl,
            )
            limits = self.services.approvals
            opened = await store.open_approval(
                approval,
                now,
                max_pending=limits.max_pending,
                max_pending_per_agent=limits.max_pending_per_agent,
            )
            if opened is None:
                raise ApprovalCap("too many approvals are pending; ask again later")
            approval, created = opened
            if created:
                self._approval_event("requested", approval)
            if approval.state is State.PENDING and spec.hold > 0:
                waited = time.perf_counter()
                held = await self._hold(approval.id, min(spec.hold, approval.expires - now))
                self.metrics.approval_wait_seconds.observe(time.perf_counter() - waited)
                approval = held or approval
            if approval.state is State.APPROVED and await self._use_grant(call, fp):
                return
        except StoreError as exc:
            self.metrics.store_errors.labels("approvals").inc()
            raise Unavailable(f"approvals are unavailable: {exc}", component="store") from None
        raise approval_refusal(approval, hold=spec.hold)

    async def _hold(self, approval_id: str, seconds: float) -> Approval | None:
        """Waits for a decision, but not past shutdown: a held call is then answered
        "pending" (its approval stays in the store) instead of being cut off."""
        waiting = asyncio.ensure_future(self.services.store.wait_approval(approval_id, seconds))
        stopping = asyncio.ensure_future(self.services.stopping.wait())
        try:
            await asyncio.wait((waiting, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not waiting.done():
                waiting.cancel()
        if waiting.cancelled() or not waiting.done():
            return None
        return waiting.result()

    async def _use_grant(self, call: Call, fp: str) -> bool:
        grant = await self.services.store.use_grant(fp, time.time())
        if grant is None:
            return False
        call.approval = grant.approval_id
        return True

    def _approval_event(self, event: str, approval: Approval) -> None:
        if self.services.notify is not None:
            self.services.notify(event, approval)

    async def take_limits(self, call: Call, _: Exchange) -> None:
        """Reserves every limit of the allowing rule atomically, or refuses with 429."""
        decision = call.decision
        if decision is None or decision.effect is not Effect.ALLOW or decision.rule_id is None:
            return
        rule = self.runtime.policy.rule(decision.rule_id)
        if not rule.limits or call.store_error is not None:
            return  # with the store down, only allow_cached reaches here, by design
        principal = call.principal
        if principal is None:
            raise MissingCredential()
        try:
            spend = self._expected_cost(call, rule, principal)
            wanted = reservations(
                rule, call.action, principal, Facts(task_id=call.task), call.now, spend
            )
        except LimitKeyError as exc:
            raise Denied(str(exc), rule=rule.id) from None
        call.cost = spend
        try:
            exceeded = await self.services.store.reserve(wanted, call.now)
        except StoreError as exc:
            self.metrics.store_errors.labels("reserve").inc()
            call.store_error = str(exc)
            self._degraded(call)
            return
        if exceeded is None:
            call.reservations = tuple(wanted)
            return
        refusal = LimitRefused(
            f"limit {exceeded.name} of rule {rule.id} is used up for this window "
            f"({exceeded.used:g} of {exceeded.limit:g})",
            limit=exceeded.name,
            retry_after=exceeded.retry_after,
            rule=rule.id,
        )
        if call.enforced:
            call.refusal = refusal
        else:
            call.error = f"shadow: {refusal.detail}"

    async def audit_decision(self, call: Call, _: Exchange) -> None:
        """The decision's record, before anything is forwarded. With `audit.required` it is
        awaited, and a record that cannot be written refuses the call (503), as secret
        managers treat their audit devices; otherwise a loss is counted and logged."""
        trail = self.services.audit
        if trail is None:
            return
        call.audited = True
        record = decision_record(call, time.time(), self._cost(call))
        if not self.services.audit_required:
            trail.post(record)
            return
        written = trail.submit(record)
        try:
            await asyncio.wait_for(asyncio.shield(written), AUDIT_WAIT)
        except (AuditError, TimeoutError) as exc:
            raise Unavailable(
                "the audit trail cannot record this call, so it is not forwarded",
                component="audit",
            ) from exc

    def _cost(self, call: Call) -> dict[str, Any] | None:
        decision = call.decision
        if decision is None or decision.rule_id is None:
            return None
        rule = self.runtime.policy.rule(decision.rule_id)
        if rule.cost is None:
            return None
        return {"amount": rule.cost.amount, "currency": rule.cost.currency}

    def _expected_cost(self, call: Call, rule: Rule, principal: Principal) -> float:
        """Rule cost plus, for an LLM call, its tokens' price estimated from the request
        (input from the body size, output from max_tokens): what spend limits reserve."""
        cost = rule_cost(rule, call.action, principal, Facts(task_id=call.task), call.now)
        meter = self.services.meter
        if meter is not None and call.model is not None and call.estimate is not None:
            estimate = meter.prices.cost(call.model, TokenUsage(call.estimate[0], call.estimate[1]))
            cost += estimate or 0.0
        return cost

    async def meter(self, call: Call) -> None:
        """After the answer: the call's real cost into the metrics, and spend limits settled
        with it (the estimate reserved up front is topped up or given back)."""
        meter = self.services.meter
        decision, principal = call.decision, call.principal
        if meter is None or decision is None or principal is None or decision.rule_id is None:
            return
        if call.status is None or call.refusal is not None:
            return
        rule = self.runtime.policy.rule(decision.rule_id)
        cost = 0.0
        if rule.cost is not None:  # most rules have none: no Facts to build, no CEL to run
            with contextlib.suppress(LimitKeyError):  # a cost key the call lacks: no cost
                cost = rule_cost(rule, call.action, principal, Facts(task_id=call.task), call.now)
        usage = None
        if call.tokens is not None:
            usage = TokenUsage(*call.tokens)
            cost += meter.token_cost(call.model, usage) or 0.0
        currency = rule.cost.currency if rule.cost else meter.settings.currency
        reserved = call.cost or 0.0
        call.cost, call.currency = cost, currency
        action = decision.matched_action or "other"
        meter.record(
            principal=principal,
            upstream=call.upstream,
            action=action,
            model=call.model,
            cost=cost,
            currency=currency,
            usage=usage,
        )
        spend = [r for r in call.reservations if self._is_spend(rule, r.name)]
        difference = cost - reserved
        if not spend or abs(difference) < 1e-12:
            return
        try:
            if difference > 0:
                extra = [Reservation(r.name, r.key, difference, math.inf, r.window) for r in spend]
                await self.services.store.reserve(extra, call.now)
            else:
                back = [Reservation(r.name, r.key, -difference, r.limit, r.window) for r in spend]
                await self.services.store.release(back, call.now)
        except StoreError as exc:
            self.metrics.store_errors.labels("settle").inc()
            log.error("call %s: spend not settled: %s", call.id, exc)

    @staticmethod
    def _is_spend(rule: Rule, name: str) -> bool:
        return any(limit.name == name and limit.spend is not None for limit in rule.limits)

    async def settle(self, call: Call) -> None:
        """After the answer: metering, and the task's history. Never raises (the answer is
        already sent)."""
        await self.meter(call)
        decision = call.decision
        if decision is None or decision.rule_id is None or call.task is None:
            return
        if call.status is None or call.status >= 400:
            return
        rule = self.runtime.policy.rule(decision.rule_id)
        if not (rule.label_task or rule.cost or self.runtime.policy.reads_task):
            return
        spent = call.cost or 0.0
        try:
            await self.services.store.record_task(
                call.task, rule.label_task, spent, self.services.task_ttl, call.now
            )
        except StoreError as exc:
            self.metrics.store_errors.labels("record_task").inc()
            log.error("call %s: task history not recorded: %s", call.id, exc)

    async def release(self, call: Call) -> None:
        """Gives back the reservations of a call that never reached the upstream."""
        try:
            await self.services.store.release(call.reservations, call.now)
        except StoreError as exc:
            self.metrics.store_errors.labels("release").inc()
            log.error("call %s: reservations not released: %s", call.id, exc)
        call.reservations = ()

    async def _task_facts(self, call: Call, task: str) -> Facts:
        try:
            history = await self.services.store.task_history(task, call.now)
        except StoreError as exc:
            self.metrics.store_errors.labels("task_history").inc()
            call.store_error = str(exc)
            return Facts(task_id=task)
        return Facts(task, history.labels, history.calls, history.spent)

    def _degraded(self, call: Call) -> None:
        """The store could not answer. A deny stands (refusing is safe whatever the store
        would have said); `on_error: allow_cached` lets a memoized allow through; every other
        allow is refused with 503 (fail closed)."""
        decision = call.decision
        if decision is not None and decision.effect is not Effect.ALLOW:
            return
        if (
            self.services.on_error == "allow_cached"
            and call.memo_hit
            and decision is not None
            and decision.effect is Effect.ALLOW
        ):
            return
        raise Unavailable("the decision store is unavailable; try again shortly", component="store")

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
            self.services.decision_log.write(call, total)
            trail = self.services.audit
            if trail is not None:
                now = time.time()
                if call.audited:
                    trail.post(outcome_record(call, now, total))
                else:
                    trail.post(decision_record(call, now, self._cost(call)))
        except Exception:
            log.exception("failed to record call %s", call.id)


def start_call(
    action: Action,
    upstream: str,
    *,
    started: float,
    now: float,
    bearer: str | None,
    declared_task: str | None,
    refusal: Refusal | None,
    traceparent: str | None = None,
    tracestate: str | None = None,
) -> Call:
    """A call as a protocol shell hands it to `Pipeline.run` (`refusal`: it could not be
    described). One read of the OS's randomness gives the trace, span and decision ids; the
    caller's trace is continued when it sent one."""
    ids = _IDS.take()
    call = Call(
        id=ids[48:],
        action=action,
        upstream=upstream,
        started=started,
        now=now,
        trace=parse_traceparent(traceparent, tracestate, ids[:32], ids[32:48]),
        bearer=bearer,
        declared_task=declared_task,
    )
    call.refusal = refusal
    return call


class _RandomIds:
    """36 bytes of the OS's randomness per call (trace, span and decision ids), read 256
    calls' worth at a time: a system call per call was a measurable share of the cost."""

    CALLS = 256

    def __init__(self) -> None:
        self._hex = ""
        self._at = 0
        # A forked child must never hand out the ids its parent already holds.
        os.register_at_fork(after_in_child=self._forget)

    def take(self) -> str:
        if self._at >= len(self._hex):
            self._hex = os.urandom(36 * self.CALLS).hex()
            self._at = 0
        start = self._at
        self._at = start + 72
        return self._hex[start : start + 72]

    def _forget(self) -> None:
        self._hex, self._at = "", 0


_IDS = _RandomIds()


def approval_refusal(approval: Approval, *, hold: float) -> ApprovalRefused:
    """Why a call that needs approval is not forwarded, in the approval's own words."""
    aid = approval.id
    if approval.state is State.PENDING:
        detail = (
            f"{approval.reason}: waiting for approval {aid} by {', '.join(approval.approvers)};"
            " send the same call again once it is approved"
        )
        return ApprovalRefused(
            detail,
            outcome="pending",
            approval_id=aid,
            rule=approval.rule,
            retry_after=max(5.0, hold),
        )
    why = f": {approval.decided_reason}" if approval.decided_reason else ""
    outcome, detail = {
        State.DENIED: ("denied", f"approval {aid} was denied by {approval.decided_by}{why}"),
        State.EXPIRED: ("expired", f"approval {aid} expired before anyone decided"),
        State.APPROVED: ("used", f"approval {aid} was already used (it granted one call)"),
    }[approval.state]
    return ApprovalRefused(detail, outcome=outcome, approval_id=aid, rule=approval.rule)


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def outcome_label(call: Call) -> str:
    """The `decision` label: the policy's effect, or why no decision was made."""
    refusal = call.refusal
    if isinstance(refusal, LimitRefused):
        return "limited"
    if isinstance(refusal, Unavailable):
        return "error"
    if call.decision is not None:
        return call.decision.effect.value
    if isinstance(refusal, Unauthenticated):
        return "unauthenticated"
    if refusal is None or refusal.fault == "client":
        return "invalid"
    return "error"
