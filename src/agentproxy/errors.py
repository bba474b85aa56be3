"""The faults that refuse a call.

A policy deny is a value (`core.Decision`); everything in this module is an exception that
stops a call. Each class carries whose fault it is and the status it maps to, so the entry
points have one `except Refusal` and render it in their own protocol (h11's `ProtocolError`
carries a status hint the same way). Detail lives in fields, not in more classes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar, Literal

Fault = Literal["client", "policy", "proxy", "upstream"]

PROBLEM_BASE = "https://agentproxy.dev/problems/"


class Refusal(Exception):
    """A call that will not be forwarded (or could not be completed).

    `detail` is shown to the caller: it must never hold a token or a secret.
    `headers` are extra response headers the protocol adapter may emit (e.g. `Retry-After`).
    """

    status: ClassVar[int] = 500
    problem: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"
    fault: ClassVar[Fault] = "proxy"

    def __init__(
        self,
        detail: str,
        *,
        rule: str | None = None,
        headers: Mapping[str, str] | None = None,
        members: Mapping[str, str | int | float] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.rule = rule
        self.headers: Mapping[str, str] = headers or {}
        # Protocol-neutral extra facts (`limit`, `approval_id`): problem+json members,
        # JSON-RPC error data, gRPC trailing metadata.
        self.members: Mapping[str, str | int | float] = members or {}

    @property
    def problem_type(self) -> str:
        return PROBLEM_BASE + self.problem

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.detail!r})"


class BadRequest(Refusal):
    """The request cannot be interpreted unambiguously (path tricks, bad headers)."""

    status = 400
    problem = "bad-request"
    title = "Bad request"
    fault = "client"


class HeadTooLarge(BadRequest):
    """A request head over the listener's bounds (fields, their number, its size)."""

    status = 431
    problem = "head-too-large"
    title = "Request header fields too large"


class TargetTooLong(BadRequest):
    """A request target over the listener's bound."""

    status = 414
    problem = "target-too-long"
    title = "Request target too long"


class Unauthenticated(Refusal):
    """No credential, or one that does not verify. Maps to 401 + `WWW-Authenticate`."""

    status = 401
    problem = "unauthenticated"
    title = "Unauthenticated"
    fault = "client"


class MissingCredential(Unauthenticated):
    """No credential at all. RFC 6750 §3.1: the challenge then carries no error code."""

    def __init__(self, detail: str = "missing bearer token", **kw: object) -> None:
        super().__init__(detail, **kw)  # type: ignore[arg-type]


class Denied(Refusal):
    """The policy refused the call (an enforced deny or default deny)."""

    status = 403
    problem = "denied"
    title = "Denied by policy"
    fault = "policy"


class CorsRefused(Refusal):
    """A browser request from an origin the upstream's `cors.allow_origins` does not list
    (or to an upstream without `cors:`): 403, with no CORS headers, so the page reads
    nothing. A preflight is refused this way too, never with a 401."""

    status = 403
    problem = "cors-refused"
    title = "Cross-origin request refused"
    fault = "client"


class InsufficientScope(Denied):
    """Denied for want of token scopes that a rule would allow the call with: the caller can
    step up (RFC 6750 §3.1). `scopes`: what to ask for, the rule's whole set."""

    problem = "insufficient-scope"
    title = "Insufficient scope"

    def __init__(self, detail: str, *, scopes: tuple[str, ...], **kw: object) -> None:
        super().__init__(detail, **kw)  # type: ignore[arg-type]
        self.scopes = scopes


class NoRoute(Refusal):
    """No upstream is configured for this request."""

    status = 404
    problem = "no-route"
    title = "No upstream for this path"
    fault = "client"


class NotFound(Refusal):
    """What the request names does not exist (an approval id, a pinned tool)."""

    status = 404
    problem = "not-found"
    title = "Not found"
    fault = "client"


class Conflict(Refusal):
    """The request cannot apply in the current state (approving a decided approval)."""

    status = 409
    problem = "conflict"
    title = "Conflict"
    fault = "client"


class LimitRefused(Refusal):
    """A rate limit or budget of the allowing rule is used up for this window.

    Carries `Retry-After` (RFC 9110 §10.2.3) and the limit's name as the `limit` member.
    """

    status = 429
    problem = "limit-exceeded"
    title = "Limit exceeded"
    fault = "client"

    def __init__(
        self, detail: str, *, limit: str, retry_after: float, rule: str | None = None
    ) -> None:
        seconds = str(max(1, math.ceil(retry_after)))
        super().__init__(
            detail, rule=rule, headers={"Retry-After": seconds}, members={"limit": limit}
        )
        self.limit = limit


class ApprovalRefused(Refusal):
    """A call that needs a human's approval and does not have it (yet).

    `outcome` is `pending` (ask again after Retry-After: the call goes through once
    approved), `denied` (with the approver's reason), `expired` or `used` (a one-call grant
    already spent); it names the problem type. `approval_id` travels as a member.
    """

    status = 403
    title = "Approval required"
    fault = "policy"

    def __init__(
        self,
        detail: str,
        *,
        outcome: str,
        approval_id: str,
        rule: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after else None
        super().__init__(detail, rule=rule, headers=headers, members={"approval_id": approval_id})
        self.outcome = outcome
        self.approval_id = approval_id

    @property
    def problem_type(self) -> str:
        name = "approval-pending" if self.outcome == "pending" else f"approval-{self.outcome}"
        return PROBLEM_BASE + name


class ApprovalCap(Refusal):
    """Too many approvals are pending (in total or for this agent): ask again later."""

    status = 429
    problem = "approval-cap"
    title = "Too many pending approvals"
    fault = "client"

    def __init__(self, detail: str, *, retry_after: float = 60.0) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


class PayloadTooLarge(Refusal):
    status = 413
    problem = "payload-too-large"
    title = "Request body too large"
    fault = "client"


class UnsupportedMediaType(Refusal):
    """A body policy must read is not in a media type the proxy reads (JSON, form)."""

    status = 415
    problem = "unsupported-media-type"
    title = "Unsupported media type"
    fault = "client"


class ClientLeft(Refusal, ConnectionResetError):
    """The client closed its connection before its request body ended: routine, not a bug
    (nothing can be answered, but the call is recorded as refused, not as a fault)."""

    status = 400
    problem = "bad-request"
    title = "Bad request"
    fault = "client"


class BodyTimeout(Refusal):
    """The request body stopped arriving for longer than `listen.body_timeout`."""

    status = 408
    problem = "body-timeout"
    title = "Request body timed out"
    fault = "client"


class Unavailable(Refusal):
    """A dependency the decision needs is down (identity keys, store, audit): fail closed.

    `component` names it and becomes the problem type: `identity-unavailable`,
    `store-unavailable`, `audit-unavailable`.
    """

    status = 503
    title = "Service unavailable"
    fault = "proxy"

    def __init__(self, detail: str, *, component: str, **kw: object) -> None:
        super().__init__(detail, **kw)  # type: ignore[arg-type]
        self.component = component

    @property
    def problem_type(self) -> str:
        return f"{PROBLEM_BASE}{self.component}-unavailable"


class UpstreamFailed(Refusal):
    status = 502
    problem = "upstream-unavailable"
    title = "Upstream unavailable"
    fault = "upstream"


class UnshapedAnswer(UpstreamFailed):
    """An answer the allowing rule must shape (`redact_fields`, `keep_items`) that cannot be:
    not JSON, too large, compressed unreadably. Never passed on unshaped."""

    problem = "answer-not-shaped"
    title = "Answer could not be shaped"


class CredentialRefused(Refusal):
    """The upstream's authorization server refused to exchange the caller's token for the
    upstream's (`credentials.token_exchange`): the caller may not reach that upstream."""

    status = 403
    problem = "upstream-credential-refused"
    title = "Upstream credential refused"
    fault = "upstream"


class CredentialUnavailable(UpstreamFailed):
    """The upstream's authorization server could not be asked, or answered nothing usable:
    the call is not forwarded without its credential."""

    problem = "upstream-credential-unavailable"
    title = "Upstream credential unavailable"


class UpstreamTimeout(Refusal, TimeoutError):
    status = 504
    problem = "upstream-timeout"
    title = "Upstream timed out"
    fault = "upstream"


class InternalError(Refusal):
    """A bug in the proxy. The detail shown to callers is always generic."""

    status = 500
    problem = "internal"
    title = "Internal error"
    fault = "proxy"
