"""The admin gRPC listener: agentproxy.v1.Authorizer and agentproxy.v1.Approvals.

Authorizer.Check asks the one pipeline for a decision (through the backend's `check`);
Approvals applies the same rules as the admin HTTP API (approvers see and decide what names
them, operators see all, four eyes), through the same backend methods.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import AsyncIterator
from typing import Any, Protocol

import grpc
import orjson
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from grpc import aio

from agentproxy.admin.server import ApprovalsBackend, visible
from agentproxy.approvals.lifecycle import Approval, Event, State
from agentproxy.approvals.service import WATCH_QUEUE
from agentproxy.core import Action, Call, Principal, plain
from agentproxy.errors import (
    ApprovalCap,
    ApprovalRefused,
    BadRequest,
    Conflict,
    Denied,
    LimitRefused,
    NotFound,
    Refusal,
    Unauthenticated,
)
from agentproxy.protocols import grpc as grpc_adapter
from agentproxy.protocols import mcp as mcp_adapter
from agentproxy.protocols.http import describe as describe_http
from agentproxy.store import StoreError
from agentproxy.store.base import PAGE_LIMIT
from agentproxy.v1 import approvals_pb2, approvals_pb2_grpc, authorizer_pb2, authorizer_pb2_grpc

__all__ = ["WATCH_QUEUE", "GrpcBackend", "add_admin_services"]

# Watch: how often the store is read for changes made by other replicas.
WATCH_POLL = 1.0


class GrpcBackend(ApprovalsBackend, Protocol):
    async def check(
        self,
        *,
        token: str | None,
        describe: Action | Refusal,
        task: str | None,
        traceparent: str | None,
        upstream: str | None = None,
    ) -> tuple[Call, list[tuple[str, str]]]:
        """The finished call (decision, refusal, status) as the data plane's pipeline decided
        it and, when allowed, the context metadata the proxy would add."""

    def subscribe_approvals(self) -> asyncio.Queue[tuple[str, Approval]]:
        """This replica's approval events as they happen, until unsubscribed."""

    def unsubscribe_approvals(self, queue: asyncio.Queue[tuple[str, Approval]]) -> None: ...

    async def grpc_method(self, service: str, path: str) -> grpc_adapter.Method | None:
        """What the descriptor set of the upstream serving `service` says about `path`.
        Raises NoRoute, or Unavailable when reflection cannot be read."""


def add_admin_services(server: aio.Server, backend: GrpcBackend) -> None:
    # The generated registration functions are untyped (grpcio-tools writes no stubs for them).
    add_authorizer: Any = authorizer_pb2_grpc.add_AuthorizerServicer_to_server
    add_approvals: Any = approvals_pb2_grpc.add_ApprovalsServicer_to_server
    add_authorizer(AuthorizerService(backend), server)
    add_approvals(ApprovalsService(backend), server)


# --- Authorizer ------------------------------------------------------------------------------

Outcome = authorizer_pb2.Outcome


async def describe_request(request: Any, backend: GrpcBackend) -> Action | Refusal:
    """The action a CheckRequest names, described by the protocol adapter that would have
    described the real call; or why it cannot be."""
    kind = request.WhichOneof("call")
    try:
        if kind == "http":
            action, _ = describe_http(request.http.method, request.http.path)
            return action
        if kind == "grpc":
            base = grpc_adapter.describe(request.grpc.method)
            method = await backend.grpc_method(base.operation, base.target)
            args = grpc_args(request.grpc, method)
            return Action(base.protocol, base.operation, base.target, args=args, name=base.name)
        if kind == "mcp":
            arguments = _struct(request.mcp, "arguments")
            return mcp_adapter.describe_call(request.mcp.method, request.mcp.name, arguments)
    except Refusal as refusal:
        return refusal
    return BadRequest("say which call to check: one of http, grpc or mcp")


def grpc_args(call: Any, method: grpc_adapter.Method | None) -> dict[str, Any] | None:
    """`args` as the data plane would decode them. Raises BadRequest for a message that does
    not decode, or fields the message type does not have."""
    which = call.WhichOneof("request")
    if method is None:
        if which == "message":
            raise BadRequest(f"no descriptor set describes {call.method}: send args instead")
        return _struct(call, "args")
    if which == "message":
        return grpc_adapter.decode_args(method, call.message)
    return grpc_adapter.args_from_json(method, _struct(call, "args") or {})


def _struct(message: Any, name: str) -> dict[str, Any] | None:
    if not message.HasField(name):
        return None
    value: dict[str, Any] = json_format.MessageToDict(getattr(message, name))
    return value


def outcome_of(call: Call) -> Any:
    refusal = call.refusal
    if refusal is None:
        return Outcome.ALLOWED
    if isinstance(refusal, Unauthenticated):
        return Outcome.UNAUTHENTICATED
    if isinstance(refusal, ApprovalRefused):
        pending = refusal.outcome == "pending"
        return Outcome.APPROVAL_PENDING if pending else Outcome.DENIED
    if isinstance(refusal, Denied):
        return Outcome.DENIED
    if isinstance(refusal, LimitRefused | ApprovalCap):
        return Outcome.LIMITED
    if refusal.fault == "client":
        return Outcome.INVALID
    return Outcome.UNAVAILABLE  # store, audit, identity keys, or a bug: fail closed


def check_response(call: Call, context: list[tuple[str, str]]) -> Any:
    decision, refusal = call.decision, call.refusal
    response = authorizer_pb2.CheckResponse(
        outcome=outcome_of(call),
        decision_id=call.id,
        action=call.action.name,
        enforced=call.enforced,
        http_status=call.status or 0,
        grpc_code=0 if refusal is None else grpc_adapter.code_of(refusal).value,
    )
    if decision is not None:
        response.effect = decision.effect.value
        response.rule = decision.rule_id or ""
        response.reason = decision.reason
        response.policy_version = decision.policy_version
    if refusal is not None:
        response.reason = refusal.detail
        response.rule = refusal.rule or response.rule
        response.problem_type = refusal.problem_type
        response.approval_id = str(refusal.members.get("approval_id", ""))
        response.limit = str(refusal.members.get("limit", ""))
        retry = refusal.headers.get("Retry-After")
        if retry is not None:
            response.retry_after_seconds = float(retry)
    else:
        response.context.update(dict(context))
    return response


class AuthorizerService(authorizer_pb2_grpc.AuthorizerServicer):
    def __init__(self, backend: GrpcBackend) -> None:
        self.backend = backend

    async def Check(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        call, forwarded = await self.backend.check(
            token=request.token or None,
            describe=await describe_request(request, self.backend),
            task=request.task or None,
            traceparent=request.traceparent or None,
            upstream=request.upstream or None,
        )
        return check_response(call, forwarded)


# --- Approvals -------------------------------------------------------------------------------


def approval_message(approval: Approval, *, arguments: bool = False) -> Any:
    """`arguments`: with the arguments whole (Get), else by size and digest (lists, events)."""
    message = approvals_pb2.Approval(
        id=approval.id,
        state=approval.state.value,
        rule=approval.rule,
        reason=approval.reason,
        agent=approval.agent,
        user=approval.user or "",
        chain=list(approval.chain),
        action=approval.action,
        approvers=list(approval.approvers),
        created=_timestamp(approval.created),
        expires=_timestamp(approval.expires),
        grant_ttl_seconds=approval.grant_ttl or 0.0,
        decided_by=approval.decided_by or "",
        decided_reason=approval.decided_reason or "",
        upstream=approval.upstream,
        task=approval.task or "",
        arguments_bytes=approval.arguments_bytes,
        arguments_sha256=approval.arguments_sha256,
        quorum=approval.quorum,
        votes=[
            approvals_pb2.Vote(by=v.by, reason=v.reason, at=_timestamp(v.at))
            for v in approval.votes
        ],
    )
    if arguments and approval.arguments is not None:
        message.arguments_json = orjson.dumps(approval.arguments).decode()
    summary = struct_pb2.Struct()
    summary.update(plain(approval.summary))
    message.summary.CopyFrom(summary)
    query = struct_pb2.Struct()
    query.update(plain(approval.query))
    message.query.CopyFrom(query)
    if approval.decided_at is not None:
        message.decided_at.CopyFrom(_timestamp(approval.decided_at))
    return message


def _timestamp(epoch: float) -> timestamp_pb2.Timestamp:
    seconds = math.floor(epoch)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=int((epoch - seconds) * 1e9))


class ApprovalsService(approvals_pb2_grpc.ApprovalsServicer):
    def __init__(self, backend: GrpcBackend) -> None:
        self.backend = backend

    async def _approver(self, context: aio.ServicerContext[Any, Any]) -> Principal:
        """The caller, from its `authorization` metadata; aborts UNAUTHENTICATED."""
        try:
            token = grpc_adapter.bearer(tuple(context.invocation_metadata() or ()))
            if token is None:
                raise Unauthenticated("an approver's bearer token is required")
            return await self.backend.approver(token)
        except Refusal as refusal:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal.detail)
            raise  # abort raises; this line only satisfies the type checker

    async def List(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        principal = await self._approver(context)
        state = request.state or None
        if state is not None and state not in {s.value for s in State}:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"state must be one of {', '.join(s.value for s in State)}",
            )
        size = request.page_size or 100
        if not 1 <= size <= PAGE_LIMIT:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"page_size must be from 1 to {PAGE_LIMIT}"
            )
        try:
            page = await self._store(
                context, self.backend.page_approvals(state, request.page_token or None, size)
            )
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # abort raises; this line only satisfies the type checker
        return approvals_pb2.ListApprovalsResponse(
            approvals=[
                approval_message(a) for a in page.approvals if visible(self.backend, principal, a)
            ],
            next_page_token=page.next_cursor or "",
        )

    async def Get(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        principal = await self._approver(context)
        approval = await self._store(context, self.backend.get_approval(request.id))
        if approval is None or not visible(self.backend, principal, approval):
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such approval")
        return approval_message(approval, arguments=True)

    async def Approve(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        return await self._decide(request, context, Event.APPROVE)

    async def Deny(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        return await self._decide(request, context, Event.DENY)

    async def _decide(
        self, request: Any, context: aio.ServicerContext[Any, Any], event: Event
    ) -> Any:
        principal = await self._approver(context)
        if len(request.reason) > 1000:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "reason must be at most 1000 characters"
            )
        try:
            approval = await self.backend.decide_approval(
                request.id, event, principal, request.reason
            )
        except Denied as refusal:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal.detail)
        except NotFound:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such approval")
        except Conflict as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, exc.detail)
        except BadRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.detail)
        except StoreError:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the decision store is unavailable")
        return approval_message(approval)

    async def _store(self, context: aio.ServicerContext[Any, Any], read: Any) -> Any:
        try:
            return await read
        except StoreError:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the decision store is unavailable")

    async def Watch(
        self, request: Any, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        """Pending approvals first, then changes: this replica's as they happen, the rest of
        the fleet's by reading the store every WATCH_POLL seconds."""
        principal = await self._approver(context)
        queue = self.backend.subscribe_approvals()
        tracker = WatchTracker()
        try:
            pending = await self._store(context, self.backend.list_approvals("pending"))
            for approval in pending:
                if visible(self.backend, principal, approval) and tracker.changed(approval):
                    yield _event("pending", approval)
            while True:
                try:
                    event, approval = await asyncio.wait_for(queue.get(), WATCH_POLL)
                    changes = [(event, approval)]
                except TimeoutError:
                    changes = await self._fleet_changes(context, tracker)
                for event, approval in changes:
                    if visible(self.backend, principal, approval) and tracker.changed(approval):
                        yield _event(event, approval)
        finally:
            self.backend.unsubscribe_approvals(queue)

    async def _fleet_changes(
        self, context: aio.ServicerContext[Any, Any], tracker: WatchTracker
    ) -> list[tuple[str, Approval]]:
        pending = await self._store(context, self.backend.list_approvals("pending"))
        changes = [("requested", a) for a in pending if a.id not in tracker.pending]
        for gone in tracker.pending - {a.id for a in pending}:
            approval = await self._store(context, self.backend.get_approval(gone))
            if approval is not None:
                changes.append((approval.state.value, approval))
            else:
                tracker.pending.discard(gone)
        return changes


class WatchTracker:
    """What one Watch stream has told its caller: each approval's state once per change."""

    def __init__(self, remember: int = 10_000) -> None:
        self.pending: set[str] = set()
        self._told: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._remember = remember

    def changed(self, approval: Approval) -> bool:
        state = approval.state.value
        if self._told.get(approval.id) == state:
            return False
        self._told[approval.id] = state
        self._told.move_to_end(approval.id)
        if len(self._told) > self._remember:
            self._told.popitem(last=False)
        if approval.state is State.PENDING:
            self.pending.add(approval.id)
        else:
            self.pending.discard(approval.id)
        return True


def _event(event: str, approval: Approval) -> Any:
    return approvals_pb2.ApprovalEvent(event=event, approval=approval_message(approval))
