"""The one place the pipeline's order is written.

    identify → describe → pins → decide → gate → limits → audit → credential → (forward)
    → settle → record
    → trace (when tracing is on: the call's spans, queued for export)

`build()` assembles the data plane's pipeline from a runtime snapshot and the services that
outlive it; `build_explain()` the same deciding stages for `explain`, with nothing forwarded
and nothing recorded. A reload calls them again: calls in flight keep the stages, and so every
setting, they started with. `wire_approvals()` connects the approval service to whoever
reports its events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from agentproxy.approvals.lifecycle import Approval
from agentproxy.approvals.notify import Notifier
from agentproxy.approvals.service import ApprovalService
from agentproxy.audit.decision_log import DecisionLog
from agentproxy.audit.trail import AuditTrail
from agentproxy.clock import Clock
from agentproxy.config import Config
from agentproxy.identity.revocations import RevocationList
from agentproxy.identity.sts import upstream_audiences
from agentproxy.identity.upstream_tokens import UpstreamTokens
from agentproxy.metering.meter import Meter
from agentproxy.metering.metrics import Metrics
from agentproxy.policy.memo import DecisionMemo
from agentproxy.proxy.pins import McpState
from agentproxy.proxy.pipeline import Finisher, Pipeline, Stage
from agentproxy.proxy.runtime import Runtime
from agentproxy.proxy.stages.audit import AuditDecision
from agentproxy.proxy.stages.credential import UpstreamCredential
from agentproxy.proxy.stages.decide import Decide
from agentproxy.proxy.stages.describe import Describe
from agentproxy.proxy.stages.gate import Gate
from agentproxy.proxy.stages.identify import Identify
from agentproxy.proxy.stages.limits import Limits
from agentproxy.proxy.stages.pins import Pins
from agentproxy.proxy.stages.record import Record
from agentproxy.proxy.stages.settle import Settle
from agentproxy.proxy.stages.trace import Trace
from agentproxy.store import Store
from agentproxy.telemetry import Tracing


@dataclass(frozen=True, slots=True)
class Services:
    """What outlives a reload, each complete before any pipeline is built: the store and its
    revocation mirror, metrics and the meter, the approval service, the audit trail (None:
    no audit sink is configured), MCP tool pins and the clock they all read."""

    clock: Clock
    store: Store
    revocations: RevocationList
    metrics: Metrics
    meter: Meter
    approvals: ApprovalService
    mcp: McpState
    upstream_tokens: UpstreamTokens
    audit: AuditTrail | None = None
    audit_required: bool = False
    tracing: Tracing | None = None


def services(
    config: Config,
    store: Store,
    clock: Clock,
    *,
    metrics: Metrics,
    stopping: asyncio.Event,
    audit: AuditTrail | None = None,
    tracing: Tracing | None = None,
) -> Services:
    """The services for `config` over `store` (not started), nothing yet listening to the
    approval service (`wire_approvals`). Raises ValueError when the metering attribution does
    not compile (`validate` says so first)."""
    return Services(
        clock=clock,
        store=store,
        revocations=RevocationList(
            store,
            shared=config.store.redis is not None,
            on_error=lambda op: metrics.store_errors.labels(op).inc(),
            clock=clock,
        ),
        metrics=metrics,
        meter=Meter(config.metering, metrics),
        approvals=ApprovalService(
            store,
            clock,
            stopping=stopping,
            on_store_error=store_error_counter(metrics, "approvals"),
            on_pending=metrics.approvals_pending.set,
        ),
        mcp=McpState(
            on_tool_change=lambda upstream, tool: metrics.tool_changes.labels(upstream, tool).inc()
        ),
        upstream_tokens=UpstreamTokens(
            clock,
            on_outcome=lambda upstream, outcome: metrics.upstream_credentials.labels(
                upstream, outcome
            ).inc(),
        ),
        audit=audit,
        audit_required=config.audit.required,
        tracing=tracing,
    )


def build(runtime: Runtime, services: Services, decision_log: DecisionLog) -> Pipeline:
    """The data plane's pipeline for this snapshot."""
    config = runtime.config
    policy = runtime.policy
    clock = services.clock
    stages: list[Stage] = [
        *_deciding(runtime, services),
        Gate(policy, services.approvals, config.approvals, services.metrics, clock),
        Limits(policy, services.store, services.metrics, services.meter.prices),
    ]
    if services.audit is not None:
        stages.append(
            AuditDecision(services.audit, policy, clock, required=services.audit_required)
        )
    exchanges = {u.name: u.token_exchange for u in config.upstreams if u.token_exchange}
    if exchanges:
        stages.append(UpstreamCredential(services.upstream_tokens, exchanges))
    after: tuple[Finisher, ...] = (
        Settle(
            policy,
            services.meter,
            services.store,
            services.metrics,
            task_ttl=config.store.task_ttl,
        ),
        Record(services.metrics, decision_log, services.audit, policy, clock),
    )
    if services.tracing is not None:
        audit = config.audit
        after += (
            Trace(
                services.tracing,
                clock,
                config.telemetry,
                redact_paths=audit.redact,
                hmac_key=audit.hmac_key.value if audit.hmac_key else None,
            ),
        )
    return Pipeline(runtime, clock, tuple(stages), after, services.tracing)


def build_explain(runtime: Runtime, services: Services) -> Pipeline:
    """The stages that decide, exactly as they serve (revocations, tool pins and the task
    history included); a call walked through it carries a collecting tracer, and its
    exchange forwards nothing. Nothing is recorded: explaining is not calling."""
    return Pipeline(runtime, services.clock, _deciding(runtime, services), ())


def _deciding(runtime: Runtime, services: Services) -> tuple[Stage, ...]:
    config = runtime.config
    enforced = {
        u.name for u in config.upstreams if u.protocol == "mcp" and u.pin_tools == "enforce"
    }
    return (
        Identify(
            runtime.verifier,
            services.revocations,
            services.clock,
            task_from=config.identity.task_from,
            own_issuer=config.sts.issuer if config.sts is not None else None,
            bound={u.name: frozenset((u.name, *upstream_audiences(u))) for u in config.upstreams},
            resources={u.name: frozenset(u.audiences) for u in config.upstreams if u.audiences},
            issuer_audiences={i.issuer: frozenset(i.audiences) for i in config.identity.issuers},
        ),
        Describe(),
        Pins(services.mcp.pins, enforced, runtime.policy.version),
        Decide(
            runtime.policy,
            DecisionMemo(),
            services.store,
            services.metrics,
            services.clock,
            mode=config.mode,
            on_error=config.store.on_error,
        ),
    )


def wire_approvals(
    approvals: ApprovalService,
    *,
    metrics: Metrics,
    decision_log: Callable[[], DecisionLog],
    audit: AuditTrail | None,
    notifier: Notifier | None,
) -> None:
    """Every approval event becomes a metric (decisions), a decision log line, an audit
    record and a webhook. `decision_log` gives the current one (a reload may replace it)."""

    def count(event: str, approval: Approval) -> None:
        if event in ("approved", "denied", "expired"):
            metrics.approvals.labels(event).inc()

    def log_line(event: str, approval: Approval) -> None:
        # The decision log never carries a body: the arguments by size and digest only.
        decision_log().write_event(approval_record(event, approval, arguments=False))

    approvals.listen(count)
    approvals.listen(log_line)
    if audit is not None:
        trail = audit

        def seal(event: str, approval: Approval) -> None:
            trail.submit(approval_record(event, approval))

        approvals.listen(seal)
    if notifier is not None:
        approvals.listen(notifier.notify)


def approval_record(event: str, approval: Approval, *, arguments: bool = True) -> dict[str, object]:
    """An approval event as the decision log and the audit trail record it. The approval is
    nested: its own members (`chain`, the delegation chain) must not meet the members only
    the trail writes (`chain`, `seq`, `prev`, `hash`), or the trail refuses the record. The
    audit's `args.*` and `resource.query.*` redactions cover `approval.arguments.*`,
    `approval.summary.*` and `approval.query.*` (`audit.records.redaction_paths`)."""
    shown = approval.to_json()
    if not arguments:
        shown["arguments"] = None
    return {
        "kind": "approval",
        "event": event,
        "approval_id": approval.id,
        "rule": approval.rule,
        "decided_by": approval.decided_by,
        "approval": shown,
    }


def store_error_counter(metrics: Metrics, op: str) -> Callable[[], None]:
    child = metrics.store_errors.labels(op)
    return lambda: child.inc()
