"""The admin backend: what the admin APIs (HTTP and agentproxy.v1 gRPC) may ask of the proxy.

`admin/` never imports `proxy/`: it declares the protocols it needs (`AdminBackend`,
`GrpcBackend`) and this class implements them over the running process, the services and the
current pipeline. Every operation reads the snapshot current when it is asked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from agentproxy.admin.server import operator_allowed
from agentproxy.approvals.lifecycle import Approval, Event
from agentproxy.audit.decision_log import DecisionLog
from agentproxy.audit.sinks import AuditError, rotated_files
from agentproxy.clock import rfc3339
from agentproxy.config import Config
from agentproxy.core import Action, Call, Principal
from agentproxy.errors import Denied, NotFound, Refusal, Unavailable
from agentproxy.identity.sts import GRANT_TYPE, ExchangeRefused, OAuthError, exchange
from agentproxy.policy.limits import calendar_window
from agentproxy.protocols.grpc import Method as GrpcMethod
from agentproxy.proxy.assemble import Services
from agentproxy.proxy.check import check
from agentproxy.proxy.explain import explain
from agentproxy.proxy.ext_authz import GatewayRequest, decide_request
from agentproxy.proxy.grpc_upstreams import Descriptors
from agentproxy.proxy.pipeline import Pipeline
from agentproxy.store import ApprovalPage, Revocation

log = logging.getLogger("agentproxy.admin")
# How long an exchange waits for its record when `audit.required` (as a call does).
AUDIT_WAIT = 2.0


class Process(Protocol):
    """The running proxy, as the backend sees it."""

    @property
    def config(self) -> Config: ...

    @property
    def pipeline(self) -> Pipeline: ...

    @property
    def explainer(self) -> Pipeline: ...

    @property
    def decision_log(self) -> DecisionLog: ...

    def is_ready(self) -> bool: ...

    async def reload(self) -> bool: ...


class ProxyBackend:
    """Implements `admin.server.AdminBackend` and `admin.grpc.GrpcBackend`."""

    def __init__(self, process: Process, services: Services, descriptors: Descriptors) -> None:
        self._process = process
        self._services = services
        self._descriptors = descriptors

    # --- probes, keys, metrics ---------------------------------------------------------------

    @property
    def registry(self) -> CollectorRegistry:
        return self._services.metrics.exposition

    def is_ready(self) -> bool:
        return self._process.is_ready()

    def jwks(self) -> dict[str, Any]:
        """The context signer's key, and the STS's (tools verify both kinds of token)."""
        runtime = self._process.pipeline.runtime
        keys = runtime.signer.jwks()
        if runtime.sts is not None:
            keys = {"keys": [*keys["keys"], runtime.sts.signer.jwk()]}
        return keys

    def sts_metadata(self) -> dict[str, Any] | None:
        """RFC 8414 authorization server metadata of the STS (None: `sts:` is not set)."""
        sts = self._process.pipeline.runtime.sts
        if sts is None:
            return None
        issuer = sts.signer.settings.issuer
        base = issuer.rstrip("/")
        return {
            "issuer": issuer,
            "token_endpoint": f"{base}/v1/token",
            "jwks_uri": f"{base}/.well-known/jwks.json",
            "grant_types_supported": [GRANT_TYPE],
            "token_endpoint_auth_methods_supported": ["none", "private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": [sts.signer.algorithm],
        }

    async def exchange_token(self, form: Mapping[str, Sequence[str]]) -> dict[str, Any]:
        """`POST /v1/token`: the RFC 8693 response. Every exchange, issued or refused, is
        counted, written to the decision log and sealed in the audit trail (never a token).
        Raises OAuthError (the client's error, None when `sts:` is not set), Unavailable."""
        runtime = self._process.pipeline.runtime
        if runtime.sts is None:
            raise OAuthError(
                "unsupported_grant_type", "this proxy has no token exchange (configure sts:)"
            )
        services = self._services
        try:
            done = await exchange(
                form,
                signer=runtime.sts.signer,
                delegations=runtime.sts.delegations,
                verifier=runtime.verifier,
                revocations=services.revocations,
                now=services.clock.now(),
            )
        except ExchangeRefused as refused:
            await self._record_exchange(refused.record)
            raise refused.error from None
        await self._record_exchange(done.record)
        return done.response

    async def _record_exchange(self, record: dict[str, Any]) -> None:
        """With `audit.required` a token is issued only once its record is sealed
        (Unavailable otherwise), as a call is forwarded only once its decision is."""
        services = self._services
        record = {"at": rfc3339(services.clock.now()), **record}
        services.metrics.sts_tokens.labels(record["outcome"]).inc()
        self._process.decision_log.write_event(record)
        if services.audit is None:
            return
        written = services.audit.submit(record)
        if not services.audit_required or record["outcome"] != "issued":
            return
        try:
            await asyncio.wait_for(asyncio.shield(written), AUDIT_WAIT)
        except (AuditError, TimeoutError) as exc:
            raise Unavailable(
                "the audit trail cannot record this exchange, so no token is issued",
                component="audit",
            ) from exc

    def policy_version(self) -> str:
        return self._process.pipeline.runtime.policy.version

    def audit_files(self) -> list[Path]:
        path = self._process.config.audit.file
        if path is None:
            return []
        return [*rotated_files(path), *([path] if path.exists() else [])]

    # --- who is asking -----------------------------------------------------------------------

    async def approver(self, token: str) -> Principal:
        """Raises Unauthenticated, Unavailable (the issuer's keys)."""
        runtime = self._process.pipeline.runtime
        return await runtime.verifier.verify(token, self._services.clock.now())

    async def operator(self, token: str) -> Principal:
        """Raises Unauthenticated, Unavailable, Denied (not an operator)."""
        principal = await self.approver(token)
        operator_allowed(principal, self._process.config.admin.operators)
        return principal

    def is_operator(self, principal: Principal) -> bool:
        try:
            operator_allowed(principal, self._process.config.admin.operators)
        except Denied:
            return False
        return True

    # --- operator actions --------------------------------------------------------------------

    async def revoke(self, revocation: Revocation) -> None:
        """Writes to the store (the fleet sees it within a second) and applies it here now.
        Raises StoreError."""
        await self._services.store.revoke(revocation)
        await self._services.revocations.refresh()
        log.warning("revoked %s %s until %s", revocation.kind, revocation.subject, revocation.until)

    async def explain(
        self,
        token: str,
        request: str,
        task: str | None,
        args: dict[str, Any] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> dict[str, Any]:
        """Raises Refusal (the token or request would be refused)."""
        return await explain(
            self._process.explainer,
            token,
            request,
            task=task,
            args=args,
            body=body,
            content_type=content_type,
        )

    async def accept_tool(self, upstream: str, tool: str) -> str:
        """The accepted definition's fingerprint. Raises NotFound when the tool has no
        unaccepted change."""
        fingerprint = self._services.mcp.pins.accept(upstream, tool)
        if fingerprint is None:
            raise NotFound(f"tool {tool!r} of upstream {upstream!r} has no unaccepted change")
        return fingerprint

    async def reload(self) -> bool:
        return await self._process.reload()

    async def budgets(self) -> list[dict[str, Any]]:
        """Every spend limit of the policy in force, and each of its live counters in its
        current window: who (the counter's key), the window, used, limit, remaining."""
        pipeline = self._process.pipeline
        now = pipeline.clock.now()
        limits: dict[str, dict[str, Any]] = {}
        for rule in pipeline.runtime.policy.rules:
            for limit in rule.limits:
                if limit.spend is None:
                    continue
                entry = limits.setdefault(
                    limit.name,
                    {
                        "limit": limit.name,
                        "rules": [],
                        "spend": limit.spend,
                        "currency": limit.currency or pipeline.runtime.config.metering.currency,
                        "window": limit.calendar or f"{limit.window:g}s",
                        "counters": [],
                    },
                )
                entry["rules"].append(rule.id)
                entry["spend"] = min(entry["spend"], limit.spend)
                if limit.calendar is not None:
                    start, length = calendar_window(limit.calendar, now)
                else:
                    length = limit.window
                    start = now - now % length
                entry.setdefault("_current", (start, length))
        counters = await self._services.store.counters([f"{name}:" for name in limits], now)
        for counter in counters:
            name, _, key = counter.key.partition(":")
            found = limits.get(name)
            if found is None:
                continue
            start, length = found["_current"]
            if abs(counter.start - start) > 1e-6:
                continue  # a window that has ended, kept a few seconds for settlement
            found["counters"].append(
                {
                    "key": key,
                    "window_start": rfc3339(start),
                    "window_end": rfc3339(start + length),
                    "used": round(counter.used, 9),
                    "remaining": round(max(0.0, found["spend"] - counter.used), 9),
                }
            )
        for entry in limits.values():
            del entry["_current"]
        return list(limits.values())

    # --- approvals ---------------------------------------------------------------------------

    async def list_approvals(self, state: str | None) -> list[Approval]:
        return await self._services.approvals.list(state)

    async def page_approvals(
        self, state: str | None, cursor: str | None, limit: int
    ) -> ApprovalPage:
        return await self._services.approvals.page(state, cursor, limit)

    async def get_approval(self, approval_id: str) -> Approval | None:
        return await self._services.approvals.get(approval_id)

    async def decide_approval(
        self, approval_id: str, event: Event, principal: Principal, reason: str
    ) -> Approval:
        return await self._services.approvals.decide(approval_id, event, principal, reason)

    def subscribe_approvals(self) -> asyncio.Queue[tuple[str, Approval]]:
        return self._services.approvals.subscribe()

    def unsubscribe_approvals(self, queue: asyncio.Queue[tuple[str, Approval]]) -> None:
        self._services.approvals.unsubscribe(queue)

    # --- Authorizer.Check --------------------------------------------------------------------

    async def grpc_method(self, service: str, path: str) -> GrpcMethod | None:
        runtime = self._process.pipeline.runtime
        methods = await self._descriptors.methods(runtime, runtime.route_grpc(service))
        return methods.get(path) if methods is not None else None

    async def gateway_check(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[bool, int, list[tuple[str, str]], list[str], bytes] | None:
        if self._process.pipeline.runtime.config.listen.ext_authz is None:
            return None
        answer = await decide_request(
            self._process.pipeline, GatewayRequest(method, path, headers, body, http_mode=True)
        )
        return answer.allowed, answer.status, answer.headers, answer.remove, answer.body

    async def check(
        self,
        *,
        token: str | None,
        describe: Action | Refusal,
        task: str | None,
        traceparent: str | None,
        upstream: str | None = None,
    ) -> tuple[Call, list[tuple[str, str]]]:
        return await check(
            self._process.pipeline,
            token=token,
            describe=describe,
            task=task,
            traceparent=traceparent,
            upstream=upstream,
        )
