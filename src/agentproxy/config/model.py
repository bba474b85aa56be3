"""The typed, validated configuration: what `config.load()` returns.

Every value here has been checked; secret-bearing values are `Secret`s, which mask
themselves in `repr` and logs. Paths are absolute (resolved against the config file).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from agentproxy.core import Effect, Mode, Principal


@dataclass(frozen=True, slots=True)
class Position:
    """Where a value was written: `file:line:column` (1-based), for error messages."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret read from a file. `repr` and `str` never show the value."""

    value: bytes = field(repr=False)
    source: str

    def __repr__(self) -> str:
        return f"Secret(from {self.source!r})"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class PrincipalRef:
    """One entry naming principals, as rules (`agents`), approvers and operators write them:
    an id (`pay-bot`, `user:carol`), `role:NAME`, a glob (`ci-*`) or `*`, optionally bound to
    the issuer that must have issued the token: `role:security@https://idp.example/staff`.

    A `role:` entry matches roles only, never an id: a token whose subject is the text
    `role:security` is not a security operator. An entry bound to an issuer matches only
    tokens from it, so a partner issuer's `sub: ops-admin` is not this IdP's `ops-admin`.
    """

    kind: Literal["id", "role", "glob", "any"]
    value: str
    issuer: str | None = None

    @classmethod
    def parse(cls, text: str) -> PrincipalRef:
        """`@ISSUER` binds the entry when what follows the last `@` is a URL (has `://`), so
        an e-mail-like id (`alice@example.com`) stays an id. Raises ValueError for an empty
        entry or role."""
        entry, at, issuer = text.rpartition("@")
        if not at or "://" not in issuer:
            entry, issuer = text, ""
        if entry.startswith("role:"):
            if not entry[5:]:
                raise ValueError(f"{text!r}: a role entry names a role (role:NAME)")
            return cls("role", entry[5:], issuer or None)
        entry = entry.removeprefix("user:")
        if not entry:
            raise ValueError(f"{text!r}: an empty principal")
        if entry == "*":
            return cls("any", "*", issuer or None)
        kind: Literal["id", "glob"] = "glob" if any(c in entry for c in "*?[") else "id"
        return cls(kind, entry, issuer or None)

    def matches(self, principal: Principal) -> bool:
        """Whether the acting agent (`id`, `glob`) or one of its roles is what this names."""
        if self.issuer is not None and principal.issuer != self.issuer:
            return False
        if self.kind == "role":
            return self.value in principal.roles
        if self.kind == "any":
            return True
        if principal.agent.startswith("role:"):
            return False
        if self.kind == "id":
            return principal.agent == self.value
        return fnmatch.fnmatchcase(principal.agent, self.value)


def names_principal(entries: tuple[str, ...], principal: Principal) -> bool:
    """Whether any entry names `principal` (see `PrincipalRef`). Entries are validated at
    load; one that does not parse names nobody."""
    for entry in entries:
        try:
            if PrincipalRef.parse(entry).matches(principal):
                return True
        except ValueError:
            continue
    return False


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Listen:
    http: HostPort
    admin: HostPort
    # Absent: no listener. The gRPC data plane, and agentproxy.v1 (Authorizer, Approvals).
    grpc: HostPort | None = None
    admin_grpc: HostPort | None = None
    # Envoy's external authorization (envoy.service.auth.v3.Authorization, gRPC).
    ext_authz: HostPort | None = None
    # Bounds on the HTTP listeners' clients (per listener, so per worker process).
    max_connections: int = 10_000  # data plane; beyond it a new connection gets 503 and closes
    header_timeout: float = 10.0  # a request head, once begun, must arrive within this
    idle_timeout: float = 60.0  # a keep-alive connection with no request is closed after this
    body_timeout: float = 10.0  # the longest wait for the next piece of a request body


@dataclass(frozen=True, slots=True)
class Credentials:
    """The upstream's own credential, injected by the proxy; the agent never holds it."""

    header: str
    value: Secret
    prefix: str = ""
    # What the header carries, built once: it is sent with every call.
    header_value: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "header_value", self.prefix + self.value.value.decode("latin-1"))


@dataclass(frozen=True, slots=True)
class Cors:
    """The browser origins (the MCP Inspector, a web agent) allowed to call an upstream
    across origins (`cors: {allow_origins: [...]}`), each as browsers serialize an `Origin`
    (RFC 6454 §6.1: `scheme://host[:port]`, lower case, no default port), so that an exact
    comparison is the whole check."""

    allow_origins: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.allow_origins:
            raise ValueError("cors needs at least one origin")


@dataclass(frozen=True, slots=True)
class TokenExchange:
    """A credential per call (`credentials.token_exchange`): the caller's verified token is
    exchanged (RFC 8693) at the upstream's own authorization server for one the upstream
    accepts, naming the same user and agent, and sent in `header`. The proxy authenticates as
    `client_id` (client_secret_basic, or client_secret_post for servers that want the secret
    in the form)."""

    token_url: str
    client_id: str
    client_secret: Secret
    audience: str | None = None
    resource: str | None = None
    scope: str | None = None
    header: str = "Authorization"
    prefix: str = "Bearer "
    auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    timeout: float = 5.0

    @property
    def key(self) -> tuple[str, ...]:
        """What makes a cached credential reusable: a reload that changes any of it asks anew."""
        return (
            self.token_url,
            self.client_id,
            self.audience or "",
            self.resource or "",
            self.scope or "",
        )


@dataclass(frozen=True, slots=True)
class ResourceAuthorization:
    """`upstreams[].authorization`: where clients get tokens for this upstream (RFC 9728)."""

    servers: tuple[str, ...]
    scopes_supported: tuple[str, ...] = ()

    def metadata(self, resource: str) -> dict[str, object]:
        """The protected resource metadata document (RFC 9728 §2)."""
        document: dict[str, object] = {
            "resource": resource,
            "authorization_servers": list(self.servers),
            "bearer_methods_supported": ["header"],
        }
        if self.scopes_supported:
            document["scopes_supported"] = list(self.scopes_supported)
        return document


def metadata_url(resource: str) -> str:
    """RFC 9728 §3.1: the well-known path is inserted between the resource's host and its
    path (`https://h/mcp` → `https://h/.well-known/oauth-protected-resource/mcp`)."""
    scheme, rest = resource.split("://", 1)
    host, _, path = rest.partition("/")
    suffix = "/" + path.rstrip("/") if path.rstrip("/") else ""
    return f"{scheme}://{host}/.well-known/oauth-protected-resource{suffix}"


Protocol = Literal["http", "mcp", "llm", "grpc"]

# The largest request body, by protocol, when `max_body_bytes` is not set. HTTP bodies stream
# through unread. MCP and LLM bodies are read whole and parsed before they are decided, so
# their cap is what one request can make the proxy hold and parse: an MCP tool call is a few
# KiB (1 MiB leaves room for documents in arguments); an LLM request carries the conversation
# and inline images (8 MiB: a 5 MiB image in base64, Anthropic's per-image limit).
DEFAULT_MAX_BODY_BYTES: Final[Mapping[str, int]] = {
    "http": 64 * 1024 * 1024,
    "mcp": 1024 * 1024,
    "llm": 8 * 1024 * 1024,
    "grpc": 64 * 1024 * 1024,
}


@dataclass(frozen=True, slots=True)
class OpenApiOperation:
    """One operation: `path` is an action pattern's path template (`/v1/employees/{id}`)."""

    id: str
    method: str
    path: str
    integer_params: tuple[str, ...] = ()
    # The JSON schema of an application/json request body (with the spec's components, so
    # its `$ref`s resolve), and whether a body is required.
    body_schema: Any = None
    body_required: bool = False
    body_media: tuple[str, ...] = ()  # the media types its requestBody declares
    version: str = "3.1"

    @property
    def action(self) -> str:
        return f"http:{self.method} {self.path}"


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str
    protocol: Protocol = "http"
    path_prefix: str | None = None
    timeout: float = 30.0
    credentials: Credentials | None = None
    # `credentials.token_exchange`: a credential per call instead of one static key.
    token_exchange: TokenExchange | None = None
    # RFC 8707: the resource URIs a token must name in `aud` to be used here (the first is
    # the canonical one, published as `resource` in the protected resource metadata).
    audiences: tuple[str, ...] = ()
    # RFC 9728: the protected resource metadata the proxy serves for this upstream.
    authorization: ResourceAuthorization | None = None
    # MCP: how a call whose token lacks a rule's scopes is answered: the spec's HTTP 403
    # with `WWW-Authenticate: Bearer error="insufficient_scope"` (clients step up), or a
    # JSON-RPC error (older SDK clients tear the session down on a 4xx).
    scope_challenge: Literal["http403", "jsonrpc"] = "http403"
    # 0: the protocol's default (DEFAULT_MAX_BODY_BYTES).
    max_body_bytes: int = 0
    # MCP only: tool pinning (off | report | enforce) and how a refused tools/call is
    # answered (a JSON-RPC error, or a CallToolResult with isError the model can read).
    pin_tools: Literal["off", "report", "enforce"] = "report"
    tool_errors: Literal["jsonrpc", "result"] = "jsonrpc"
    # MCP only: the path of the Streamable HTTP endpoint. Only it is reached as MCP; any other
    # path of the server is an ordinary `http:` action, decided as such.
    endpoint: str = "/mcp"
    # gRPC only: the service this upstream serves (None: the default gRPC upstream), the
    # FileDescriptorSet that lets policy read request fields as `args` (or True for
    # `descriptor_set: reflection`: fetched once from the upstream's reflection service), and
    # the largest message either way.
    service: str | None = None
    descriptor_set: Path | None = None
    reflection: bool = False
    max_message_bytes: int = 4 * 1024 * 1024
    # HTTP protocols: the X-Forwarded-Host the upstream gets (absent: none; never the agent's
    # Host), and how the upstream reads paths (`paths:`): case-insensitively (Express, nginx
    # `~*`), and whether integer segments must be in canonical form (Starlette's {id:int}).
    forwarded_host: str | None = None
    path_case: Literal["sensitive", "insensitive"] = "sensitive"
    integer_segments: Literal["as_sent", "canonical"] = "as_sent"
    # The upstream serves /x/ as /x (Express without strict routing, Spring 5): such a path is
    # decided, and forwarded, as /x (`paths: {trailing_slash: ignored}`).
    trailing_slash: Literal["as_sent", "ignored"] = "as_sent"
    # Plain HTTP only: when a request body is read as `args` (`auto`: a JSON or form body,
    # when a rule that may match reads it; `json`/`form`: every body, as that kind;
    # `stream`: never), and the largest answer a rule's obligations may shape (buffered
    # whole to be shaped; a larger one is refused, never passed on unshaped).
    body: Literal["auto", "json", "form", "stream"] = "auto"
    max_response_bytes: int = 16 * 1024 * 1024
    # Plain HTTP only: the operations of the upstream's OpenAPI spec (`openapi:`).
    openapi: tuple[OpenApiOperation, ...] = ()
    # HTTP protocols: the browser origins allowed across origins (`cors:`; None: preflights
    # are refused and the upstream's own CORS headers pass as they are).
    cors: Cors | None = None

    def __post_init__(self) -> None:
        if self.max_body_bytes == 0:
            object.__setattr__(self, "max_body_bytes", DEFAULT_MAX_BODY_BYTES[self.protocol])
        elif self.max_body_bytes < 0:
            raise ValueError("max_body_bytes must be positive")

    @property
    def is_grpc(self) -> bool:
        return self.protocol == "grpc"


@dataclass(frozen=True, slots=True)
class Issuer:
    """One trusted token issuer. Exactly one key source is set; `algorithms` is explicit."""

    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...]
    jwks_url: str | None = None
    jwks_file: Path | None = None
    public_key_file: Path | None = None
    hs256_secret: Secret | None = None
    leeway: float = 0.0
    # OIDC discovery: the key set's URL is the `jwks_uri` of the issuer's
    # /.well-known/openid-configuration, whose `issuer` must be this one (OIDC Discovery §4.3).
    discovery: bool = False


@dataclass(frozen=True, slots=True)
class ClaimNames:
    """Which token claims name the agent, its roles and its task (IdPs differ)."""

    agent: str = "sub"
    roles: str = "roles"
    task: str = "task"
    parent_task: str = "parent_task"
    # The token's scopes (RFC 8693 §4.2 `scope`, a space-separated string; Entra's `scp`
    # too when this is left at `scope`): what a rule's `scopes:` needs.
    scopes: str = "scope"


TaskSource = Literal["token", "header"]


@dataclass(frozen=True, slots=True)
class Identity:
    issuers: tuple[Issuer, ...]
    claims: ClaimNames = ClaimNames()
    max_token_bytes: int = 8192
    # Where a call's task id may come from, in order: the token's task claim, then the agent's
    # own X-Agentproxy-Task header. `[token]`: the header is refused, so the task (and its
    # history) is the identity provider's to name, not the agent's.
    task_from: tuple[TaskSource, ...] = ("token", "header")


# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
SCOPE_TOKEN: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


@dataclass(frozen=True, slots=True)
class Delegation:
    """One rule of who may act for whom (`sts.delegation_files`): the agents it covers (ids
    or globs), the users they may act for (None: the agent only for itself), the upstreams
    the token may be for (by name), the scopes it may carry, how many actors the `act` chain
    may hold (this agent included), the token's lifetime (None: `sts.ttl`) and a CEL
    condition over `actor`, `subject`, `user`, `audience`, `scopes` and `now`."""

    id: str
    agents: tuple[str, ...]
    audiences: tuple[str, ...]
    users: tuple[str, ...] | None = None
    scopes: tuple[str, ...] = ()
    max_chain: int = 1
    ttl: float | None = None
    when: str | None = None
    position: Position = Position("<memory>", 1, 1)


@dataclass(frozen=True, slots=True)
class StsSettings:
    """The token exchange endpoint (`POST /v1/token`, RFC 8693) and the tokens it issues.
    No key file: an ephemeral Ed25519 key, kept for the process's life (one replica only)."""

    issuer: str
    signing_key_file: Path | None = None
    ttl: float = 300.0
    delegation_globs: tuple[str, ...] = ()
    delegations: tuple[Delegation, ...] = ()
    # The claim of a subject token (the user's, from the IdP) that names the user.
    user_claim: str = "sub"


@dataclass(frozen=True, slots=True)
class ContextToken:
    """The signed context the proxy forwards. No key file: an ephemeral Ed25519 key."""

    signing_key_file: Path | None = None
    ttl: float = 60.0
    audience: str = "tools"


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """A calls-per-window or spend-per-window limit of a rule. Limits with the same name
    share one counter, whichever rule takes from it."""

    name: str
    window: float
    key: str
    calls: int | None = None
    spend: float | None = None
    currency: str | None = None
    position: Position = Position("<memory>", 1, 1)
    # A calendar window (UTC): "day", "week" (ISO, from Monday) or "month"; None: `window`
    # seconds, aligned to multiples of it since the epoch.
    calendar: Literal["day", "week", "month"] | None = None


@dataclass(frozen=True, slots=True)
class CostSpec:
    """A call's price: a fixed `amount`, or a CEL `expr` over the call (per record asked)."""

    amount: float
    currency: str
    expr: str | None = None


@dataclass(frozen=True, slots=True)
class ApprovalSpec:
    """How a `require_approval` rule is approved: by whom (`role:NAME`, `user:ID`, or an id),
    how long a request stays open (`timeout`), how long the call is held (`hold`), and what
    the approval grants: one call (`grant_ttl` None) or calls until `grant_ttl` passes."""

    approvers: tuple[str, ...]
    timeout: float = 15 * 60.0
    hold: float = 25.0
    grant_ttl: float | None = None
    reason: str = ""
    # How many distinct approvers must approve (N of M); one denial refuses.
    quorum: int = 1


@dataclass(frozen=True, slots=True)
class KeepItemsSpec:
    """An obligation shaping the answer: of the list at `path`, only the items for which the
    CEL condition `when` (over `item` and the call's variables) is true are passed on."""

    path: str
    when: str
    position: Position = Position("<memory>", 1, 1)


@dataclass(frozen=True, slots=True)
class RuleSpec:
    id: str
    agents: tuple[str, ...]
    users: tuple[str, ...]
    actions: tuple[str, ...]
    effect: Effect
    when: str | None = None
    reason: str = ""
    mode: Mode = Mode.ENFORCE
    position: Position = Position("<memory>", 1, 1)
    when_position: Position | None = None
    limits: tuple[LimitSpec, ...] = ()
    cost: CostSpec | None = None
    label_task: tuple[str, ...] = ()
    # Obligations on the JSON answer of a call the rule lets through: fields removed, list
    # items kept only where a condition holds.
    redact_fields: tuple[str, ...] = ()
    keep_items: tuple[KeepItemsSpec, ...] = ()
    obligations_position: Position | None = None
    builtin: bool = False
    approval: ApprovalSpec | None = None
    # Names of the upstreams the rule applies to (empty: every upstream).
    upstreams: tuple[str, ...] = ()
    # Token scopes the rule needs (all of them); without them the rule does not apply, and
    # a call no other rule allows is refused `insufficient_scope` naming them.
    scopes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyFile:
    path: str
    rules: tuple[RuleSpec, ...]
    source_digest: str


@dataclass(frozen=True, slots=True)
class SentinelSettings:
    """Redis Sentinel: the master of `service`, as the sentinels at `nodes` ("host:port") name
    it. `password` is the sentinels' own (their `requirepass`), not the master's."""

    service: str
    nodes: tuple[str, ...]
    password: Secret | None = None


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """One of three topologies: `url` (a single Redis; it may carry a password,
    `redis://:pw@host:6379/0`, which `repr` hides), `sentinel`, or `cluster_nodes` ("host:port"
    seeds of a Redis Cluster). `password` is the data nodes' password for the latter two.
    `pool_timeout`: how long a call queues for one of the `pool_size` connections before it is
    refused (the round trip's own bound starts once it has one). `wait_replicas`: approval,
    grant and revocation writes are confirmed by this many replicas (`WAIT`) or refused."""

    url: str = ""
    key_prefix: str = "agentproxy:"
    pool_size: int = 20
    timeout: float = 0.05
    sentinel: SentinelSettings | None = None
    cluster_nodes: tuple[str, ...] = ()
    password: Secret | None = None
    pool_timeout: float = 1.0
    wait_replicas: int = 0

    def __repr__(self) -> str:
        return f"RedisSettings(where={self.where!r}, key_prefix={self.key_prefix!r})"

    @property
    def where(self) -> str:
        """What the store connects to, for logs and errors; never a password."""
        if self.sentinel is not None:
            nodes = ",".join(self.sentinel.nodes)
            return f"sentinel {nodes} (service {self.sentinel.service})"
        if self.cluster_nodes:
            return f"cluster {','.join(self.cluster_nodes)}"
        return redact_url(self.url)


def redact_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}"


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """No `redis`: the embedded memory store. `on_error` says what a call that needs the
    store gets when it cannot answer: `deny` (503) or `allow_cached` (a memoized allow)."""

    redis: RedisSettings | None = None
    on_error: Literal["deny", "allow_cached"] = "deny"
    task_ttl: float = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """The tamper-evident audit trail. No sink configured: no audit records."""

    file: Path | None = None
    stdout: bool = False
    redis_stream: str | None = None
    hmac_key: Secret | None = None
    signing_key_file: Path | None = None
    checkpoint_every: int = 1000
    redact: tuple[str, ...] = ()
    required: bool = False
    max_file_bytes: int = 100 * 2**20
    rotate_every: float | None = None

    @property
    def enabled(self) -> bool:
        return self.file is not None or self.stdout or self.redis_stream is not None


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    secret: Secret | None = None


@dataclass(frozen=True, slots=True)
class ApprovalsSettings:
    webhooks: tuple[Webhook, ...] = ()
    max_pending: int = 1000
    max_pending_per_agent: int = 50
    ui_url: str | None = None
    max_pending_per_user: int = 100  # 0: no cap
    max_pending_per_rule: int = 0  # 0: no cap


@dataclass(frozen=True, slots=True)
class Price:
    """Per million tokens. Cached input defaults to the input price."""

    input_per_mtok: float
    output_per_mtok: float
    cached_input_per_mtok: float | None = None
    # The most output tokens one call of the model can produce: what a spend limit reserves
    # for a request that names no max_tokens (else `metering.default_max_output_tokens`).
    max_output_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class MeteringSettings:
    currency: str = "USD"
    prices: tuple[tuple[str, Price], ...] = ()  # (model glob, price), first match wins
    attribution: tuple[tuple[str, str], ...] = ()  # (label, CEL over principal)
    max_values: int = 100
    default_max_output_tokens: int = 4096


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """Who may call the admin API's write endpoints (revocations): agent or user ids and
    `role:NAME`, matched against a bearer token verified with `identity`."""

    operators: tuple[str, ...] = ()


OtlpProtocol = Literal["grpc", "http/protobuf"]


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """OpenTelemetry traces (`telemetry:`), exported over OTLP. Unset values fall back to the
    standard `OTEL_*` variables when the proxy starts; no endpoint in either: no tracing.
    `max_queue_size`: spans waiting for export; past it they are dropped (and counted), never
    waited for."""

    endpoint: str | None = None
    protocol: OtlpProtocol | None = None
    sample_ratio: float | None = None
    max_queue_size: int = 2048
    # Reasoning capture: an LLM call's messages and answer on its span (opt-in; the audit
    # trail's `redact` paths apply), each attribute at most `max_message_bytes`.
    capture_messages: bool = False
    max_message_bytes: int = 16 * 1024


DecisionLog = Literal["stdout", "stderr", "off"]


@dataclass(frozen=True, slots=True)
class Config:
    source: Path
    mode: Mode
    listen: Listen
    upstreams: tuple[Upstream, ...]
    identity: Identity
    context_token: ContextToken
    policy_files: tuple[PolicyFile, ...]
    decision_log: DecisionLog = "stdout"
    store: StoreSettings = StoreSettings()
    admin: AdminSettings = AdminSettings()
    audit: AuditConfig = AuditConfig()
    approvals: ApprovalsSettings = ApprovalsSettings()
    metering: MeteringSettings = MeteringSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    policy_globs: tuple[str, ...] = ()
    sts: StsSettings | None = None
