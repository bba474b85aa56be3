"""The shared types: what is asked (`Action`), who asks (`Principal`), what was decided
(`Decision`) and the one mutable record of a call (`Call`).

Values are frozen and check their invariants when built, so no caller has to.
"""

from __future__ import annotations

import base64
import enum
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentproxy.errors import Refusal

EMPTY: Mapping[str, Any] = MappingProxyType({})


LEAF, MAPPING, SEQUENCE = 0, 1, 2
# Shapes by exact type, asked first: an isinstance check against the Mapping ABC costs more
# than building the rest of an audit record's field, and nearly every value is one of these.
_SHAPES: dict[type, int] = {
    type(None): LEAF,
    str: LEAF,
    int: LEAF,
    float: LEAF,
    bool: LEAF,
    bytes: LEAF,
    dict: MAPPING,
    MappingProxyType: MAPPING,
    list: SEQUENCE,
    tuple: SEQUENCE,
}


def shape(value: Any) -> int:
    """MAPPING for any Mapping, SEQUENCE for a list or tuple, else LEAF."""
    found = _SHAPES.get(type(value))
    if found is not None:
        return found
    if isinstance(value, Mapping):
        return MAPPING
    return SEQUENCE if isinstance(value, list | tuple) else LEAF


def plain(value: Any) -> Any:
    """Mappings → dicts, tuples → lists, recursively: the JSON-shaped view that CEL (cel-cpp
    refuses anything else), audit records and metrics labels read."""
    kind = shape(value)
    if kind == MAPPING:
        return {str(k): plain(v) for k, v in value.items()}
    if kind == SEQUENCE:
        return [plain(v) for v in value]
    return value


def jsonable(value: Any) -> Any:
    """`plain`, with bytes (gRPC `bytes` fields) as base64 text: what a record that must be
    JSON (audit, approvals) holds."""
    if isinstance(value, bytes):
        return "base64:" + base64.b64encode(value).decode()
    kind = shape(value)
    if kind == MAPPING:
        return {str(k): jsonable(v) for k, v in value.items()}
    if kind == SEQUENCE:
        return [jsonable(v) for v in value]
    return value


class Effect(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    REQUIRE_APPROVAL = "require_approval"


class Mode(enum.Enum):
    ENFORCE = "enforce"
    SHADOW = "shadow"


@dataclass(frozen=True, slots=True)
class Action:
    """What the caller asks for, as one protocol adapter names it.

    `name` is the canonical action (`http:GET /v1/employees/42`) that policy globs match;
    `target` is the normalized path (or method, tool, model) that is also what gets forwarded.
    `upstream` is the name of the upstream the call goes to (set by the shell once it has
    routed the call): two MCP servers may both have an `export` tool, and rules, approvals
    and memoized decisions must tell them apart.
    """

    protocol: str
    operation: str
    target: str
    query: Mapping[str, str | tuple[str, ...]] = field(default_factory=lambda: EMPTY)
    args: Any = None
    name: str = ""
    upstream: str = ""
    # The upstream reads paths case-insensitively (`paths: {case: insensitive}`): patterns
    # match whatever the case; bindings keep the case sent, as such frameworks pass them on.
    fold_case: bool = False
    # An LLM API call's normalized facts (CEL `llm`): model, max_output_tokens (whichever of
    # max_tokens, max_completion_tokens, max_output_tokens), stream, tools; None otherwise.
    llm: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.protocol or ":" in self.protocol:
            raise ValueError(f"invalid protocol {self.protocol!r}")
        if not self.name:
            sep = " " if self.protocol == "http" else "/"
            object.__setattr__(self, "name", f"{self.protocol}:{self.operation}{sep}{self.target}")
        elif not self.name.startswith(self.protocol + ":"):
            raise ValueError(f"action {self.name!r} does not start with {self.protocol!r}")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the agent now acting, the user it acts for, and earlier actors.

    RFC 8693 §4.1: with an `act` claim the token's subject is the user and `act.sub` the
    current actor; nested `act` claims are earlier actors. `chain` lists those earlier actors,
    the earliest first. Without `act` the subject is the agent and `acting_for` is None.
    """

    agent: str
    acting_for: str | None = None
    chain: tuple[str, ...] = ()
    roles: frozenset[str] = frozenset()
    claims: Mapping[str, Any] = field(default_factory=lambda: EMPTY)
    issuer: str = ""
    token_id: str | None = None
    expires_at: float = 0.0
    task: str | None = None
    parent_task: str | None = None  # the task that delegated this one (the token says so)
    scopes: frozenset[str] = frozenset()  # the token's OAuth scopes (`identity.claims.scopes`)

    def __post_init__(self) -> None:
        for value in (self.agent, self.acting_for, *self.chain):
            if value is not None and not is_safe_identifier(value):
                raise ValueError(f"unsafe identifier {value!r} in principal")
        if not self.agent:
            raise ValueError("a principal needs an agent")


def principal_view(principal: Principal) -> dict[str, Any]:
    """`principal` as CEL sees it (policy conditions, metering attribution) and as audit
    records name it. Shared and read-only: built once per `Principal` object (see
    `_PrincipalViews`); never change what it returns."""
    return _PRINCIPAL_VIEWS.get(principal)


def _build_view(principal: Principal) -> dict[str, Any]:
    return {
        "agent": principal.agent,
        "user": principal.acting_for,
        "chain": list(principal.chain),
        "roles": sorted(principal.roles),
        "claims": plain(principal.claims),
        "issuer": principal.issuer,
        "scopes": sorted(principal.scopes),
    }


class _PrincipalViews:
    """The views of the principals seen lately, by identity.

    A verified token's `Principal` is one object reused for every call with that token (the
    verifier caches it), so its view (claims made plain, roles sorted) is built once, not for
    every condition, metering label and audit record. An entry holds the principal itself, so
    its `id()` cannot be reused by another object while the entry exists; the `is` check makes
    a stale id impossible to mistake. Used from the event loop only.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._views: OrderedDict[int, tuple[Principal, dict[str, Any]]] = OrderedDict()

    def get(self, principal: Principal) -> dict[str, Any]:
        key = id(principal)
        entry = self._views.get(key)
        if entry is not None and entry[0] is principal:
            return entry[1]
        view = _build_view(principal)
        self._views[key] = (principal, view)
        if len(self._views) > self._size:
            self._views.popitem(last=False)
        return view


_PRINCIPAL_VIEWS = _PrincipalViews()


def is_safe_identifier(value: str) -> bool:
    """Identifiers travel in headers and logs: non-empty, bounded, no control characters."""
    return 0 < len(value) <= 256 and value.isprintable()


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer. Only the default deny has no rule.

    `enforced` is False when the deciding rule is in shadow mode. `shadow_effect` and
    `shadow_rule` say what the policy would have decided had its shadow rules been enforced,
    when that differs from `effect`.
    """

    effect: Effect
    rule_id: str | None
    reason: str
    policy_version: str
    matched_action: str | None = None
    shadow_effect: Effect | None = None
    shadow_rule: str | None = None
    memoizable: bool = False
    # A deny only for want of scopes: the scopes the rule that would allow it needs (the
    # caller may step up: RFC 6750 §3.1 insufficient_scope).
    missing_scopes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.rule_id is None and self.effect is not Effect.DENY:
            raise ValueError("only the default deny may lack a rule id")
        if self.shadow_rule is not None and self.shadow_effect is None:
            raise ValueError("shadow_rule requires shadow_effect")


@dataclass(frozen=True, slots=True)
class Facts:
    """State the pipeline fetched for a decision, so that `decide()` itself does no I/O.

    The task history (`labels`, `calls`, `spent`) is fetched only when a rule reads `task`.
    """

    task_id: str | None = None
    task_labels: frozenset[str] = frozenset()
    task_calls: int = 0
    task_spent: float = 0.0
    task_parent: str | None = None  # the task that delegated this one (CEL task.parent)


def task_history_key(agent: str, task: str) -> str:
    """Where the history of `task` as `agent` runs it is kept. Per agent: a task id is
    whatever the token or the agent names, so another agent naming the same id must neither
    read nor add to this agent's history. Length-prefixed, so no (agent, task) pair can
    spell another's key."""
    return f"{len(agent)}:{agent}/{task}"


@dataclass(frozen=True, slots=True)
class Reservation:
    """Take `amount` from the counter `key`, whose fixed window is `window` seconds long
    (aligned to multiples of `window` since the epoch), unless the window's total would then
    exceed `limit`."""

    name: str
    key: str
    amount: float
    limit: float
    window: float
    # A calendar window's start (its `window` is then its length); None: aligned to multiples
    # of `window` since the epoch.
    start: float | None = None

    def __post_init__(self) -> None:
        if self.window <= 0 or self.limit < 0 or self.amount < 0:
            raise ValueError(f"invalid reservation {self!r}")

    def window_at(self, now: float) -> float:
        """The start of the window a take at `now` counts in (the calendar window's own, or
        the fixed window containing `now`)."""
        if self.start is not None:
            return self.start
        return math.floor(now / self.window) * self.window


@dataclass(frozen=True, slots=True)
class TraceContext:
    """W3C Trace Context (traceparent): the trace we continue and our own span in it.

    `parent_id`: the caller's span (from its `traceparent`), None when we started the trace.
    `span_id` is the proxy's SERVER span: the parent the upstream sees."""

    trace_id: str
    span_id: str
    flags: str = "01"
    state: str | None = None
    parent_id: str | None = None

    @property
    def sampled(self) -> bool:
        """The sampled flag (W3C Trace Context §3.2.2.5)."""
        return int(self.flags, 16) & 1 == 1

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"


@dataclass(slots=True, eq=False)
class Call:
    """The one mutable record of a call, walked through the pipeline once and recorded once.

    Once `refusal` is set nothing is forwarded. `bearer` is the raw credential: it is read by
    the identify stage and never logged, forwarded or recorded.
    """

    id: str
    action: Action
    upstream: str
    started: float
    now: float
    trace: TraceContext
    bearer: str | None = field(default=None, repr=False)
    # The upstream's credential for this call (header, value), when it is one per call
    # (`credentials.token_exchange`): set just before forwarding, never logged or recorded.
    upstream_credential: tuple[str, str] | None = field(default=None, repr=False)
    declared_task: str | None = None
    declared_parent: str | None = None  # X-Agentproxy-Parent-Task, as the agent sent it
    principal: Principal | None = None
    task: str | None = None
    parent_task: str | None = None
    # Who named the parent: "token" (its parent_task claim) or "header" (the orchestrator's
    # X-Agentproxy-Parent-Task, the agent's own word).
    parent_source: str | None = None
    decision: Decision | None = None
    enforced: bool = True
    refusal: Refusal | None = None
    status: int | None = None
    error: str | None = None
    decision_seconds: float | None = None
    upstream_seconds: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    memo_hit: bool = False
    audited: bool = False
    forwarded: bool = False  # every stage passed it: the exchange was asked to forward it
    # An MCP JSON-RPC batch: the actions after `action`, and which one was refused.
    batch: tuple[Action, ...] = ()
    refused_at: int | None = None
    # The decision of each of (action, *batch), in order; `decision` is the refused one's, or
    # the first's.
    decisions: tuple[Decision, ...] = ()
    # The facts the decision was made on; with `streaming` (a gRPC call whose request is a
    # stream), each later message is decided on them as it arrives.
    facts: Facts | None = None
    streaming: bool = False
    session: str | None = None
    approval: str | None = None  # the approval whose grant let this call through
    # Metering: the model and tokens of an LLM call, and what the call cost.
    model: str | None = None
    tokens: tuple[int, int, int] | None = None  # input, output, cached input
    # Input tokens expected, and the output asked for (None: the request names no max_tokens).
    estimate: tuple[int, int | None] | None = None
    cost: float | None = None
    currency: str | None = None
    store_error: str | None = None
    reservations: tuple[Reservation, ...] = ()
    grpc_status: int | None = None  # a gRPC call's status code (`status` is its HTTP mapping)
    # What the spend limits it took from have left: (limit, remaining, currency).
    budgets: tuple[tuple[str, float, str], ...] = ()
    # The answer shaped by obligations: the rules, and how many fields and items it lost.
    shaped: tuple[tuple[str, ...], int, int] | None = None
    # explain's collecting tracer: when set, decide() appends the steps of its evaluation.
    trace_steps: list[Any] | None = field(default=None, repr=False)
    # A sampled call's stage timings for its spans: [stage, started, ended or None (it
    # raised)] on the monotonic clock. None: the call is not traced.
    spans: list[list[Any]] | None = field(default=None, repr=False)
    # Reasoning capture (telemetry.capture_messages): the LLM answer's text, bounded.
    completion: str | None = field(default=None, repr=False)

    def allowed(self) -> list[tuple[Action, Decision]]:
        """Each message of the call (the one, or every message of a batch) that a rule
        allowed, with that rule's decision: what limits, cost and task history are taken
        for."""
        decisions = self.decisions or ((self.decision,) if self.decision is not None else ())
        return [
            (action, decision)
            for action, decision in zip((self.action, *self.batch), decisions, strict=False)
            if decision.effect is Effect.ALLOW and decision.rule_id is not None
        ]
