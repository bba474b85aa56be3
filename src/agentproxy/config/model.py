"""The typed, validated configuration: what `config.load()` returns.

Every value here has been checked; secret-bearing values are `Secret`s, which mask
themselves in `repr` and logs. Paths are absolute (resolved against the config file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agentproxy.core import Effect, Mode


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
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Listen:
    http: HostPort
    admin: HostPort


@dataclass(frozen=True, slots=True)
class Credentials:
    """The upstream's own credential, injected by the proxy; the agent never holds it."""

    header: str
    value: Secret
    prefix: str = ""


Protocol = Literal["http", "mcp", "llm", "grpc"]


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str
    protocol: Protocol = "http"
    path_prefix: str | None = None
    timeout: float = 30.0
    credentials: Credentials | None = None
    max_body_bytes: int = 64 * 1024 * 1024


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


@dataclass(frozen=True, slots=True)
class ClaimNames:
    """Which token claims name the agent, its roles and its task (IdPs differ)."""

    agent: str = "sub"
    roles: str = "roles"
    task: str = "task"


@dataclass(frozen=True, slots=True)
class Identity:
    issuers: tuple[Issuer, ...]
    claims: ClaimNames = ClaimNames()
    max_token_bytes: int = 8192


@dataclass(frozen=True, slots=True)
class ContextToken:
    """The signed context the proxy forwards. No key file: an ephemeral Ed25519 key."""

    signing_key_file: Path | None = None
    ttl: float = 60.0
    audience: str = "tools"


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


@dataclass(frozen=True, slots=True)
class PolicyFile:
    path: str
    rules: tuple[RuleSpec, ...]
    source_digest: str


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
