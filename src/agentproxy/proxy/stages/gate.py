"""gate: a call that needs a human's approval goes through only with it."""

from __future__ import annotations

import logging
import os

from agentproxy.approvals.lifecycle import Approval, State, fingerprint, shown_arguments, summarize
from agentproxy.approvals.service import ApprovalService
from agentproxy.clock import Clock
from agentproxy.config.model import ApprovalsSettings
from agentproxy.core import Call, Effect, plain
from agentproxy.errors import ApprovalCap, ApprovalRefused, Denied, Unavailable
from agentproxy.metering.metrics import Metrics
from agentproxy.policy import PolicySet
from agentproxy.proxy.pipeline import Exchange
from agentproxy.store import StoreError

log = logging.getLogger("agentproxy.gate")


class Gate:
    """`require_approval`: a stored grant lets the call through; otherwise the pending
    approval for exactly this call is found or created, and the call is held up to the
    rule's `hold` for a decision, then answered approved (forwarded), denied, expired or
    still pending (ask again; the approval id tells which)."""

    __slots__ = ("_approvals", "_caps", "_clock", "_metrics", "_policy")

    def __init__(
        self,
        policy: PolicySet,
        approvals: ApprovalService,
        caps: ApprovalsSettings,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self._policy = policy
        self._approvals = approvals
        self._caps = caps
        self._metrics = metrics
        self._clock = clock

    async def __call__(self, call: Call, exchange: Exchange) -> None:
        """Raises ApprovalRefused (pending, denied, expired, used), ApprovalCap, Denied (a
        batch, or a rule naming no approvers) or Unavailable (the store is down)."""
        decision = call.decision
        principal = call.principal
        if decision is None or decision.effect is not Effect.REQUIRE_APPROVAL:
            return
        if not call.enforced or principal is None or decision.rule_id is None:
            return
        rule = self._policy.rule(decision.rule_id)
        spec = rule.approval
        if spec is None:
            raise Denied("the rule requires approval but names no approvers", rule=rule.id)
        if call.batch:
            raise Denied(
                "a batch that needs approval cannot be approved; send that call alone", rule=rule.id
            )
        args = plain(call.action.args) if call.action.args is not None else None
        fp = fingerprint(
            principal.agent,
            principal.acting_for,
            principal.chain,
            call.action.name,
            args,
            plain(call.action.query),
            call.action.upstream,
        )
        approvals = self._approvals
        try:
            if await self._use_grant(call, fp):
                return
            now = self._clock.now()
            shown, size, digest = shown_arguments(args)
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
                upstream=call.action.upstream,
                task=call.task,
                query=plain(call.action.query),
                arguments=shown,
                arguments_bytes=size,
                arguments_sha256=digest,
                quorum=spec.quorum,
            )
            asked = approval
            opened = await approvals.open(asked, self._caps)
            if opened is None:
                raise ApprovalCap("too many approvals are pending; ask again later")
            approval = opened[0]
            if approval.state is State.PENDING and spec.hold > 0:
                waited = self._clock.monotonic()
                held = await approvals.hold(approval.id, min(spec.hold, approval.expires - now))
                self._metrics.approval_wait_seconds.observe(self._clock.monotonic() - waited)
                approval = held or approval
                if approval.state is State.PENDING and self._clock.now() >= approval.expires:
                    # Its timeout passed while the call was held: the store expires it.
                    approval = await approvals.get(approval.id) or approval
            if approval.state is State.APPROVED and await self._use_grant(call, fp):
                return
            if approval.state is State.APPROVED:
                # Its grant went to a concurrent identical call: this one asks anew (the
                # store no longer finds an approval whose grant is spent).
                opened = await approvals.open(asked, self._caps)
                if opened is None:
                    raise ApprovalCap("too many approvals are pending; ask again later")
                approval = opened[0]
                if approval.state is State.APPROVED and await self._use_grant(call, fp):
                    return
        except StoreError as exc:
            self._metrics.store_errors.labels("approvals").inc()
            log.warning("call %s: approvals store error: %s", call.id, exc)
            raise Unavailable(
                "approvals are unavailable; try again shortly", component="store"
            ) from None
        raise approval_refusal(approval, hold=spec.hold)

    async def _use_grant(self, call: Call, fp: str) -> bool:
        grant = await self._approvals.use_grant(fp)
        if grant is None:
            return False
        call.approval = grant.approval_id
        return True


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
