"""The token exchange (RFC 8693): agents trade their own credential, and the user's, for a
short-lived token for one upstream, with the `act` chain, narrowed scopes and a task id.

The pieces are pure and the endpoint (`admin/`) is their shell: `parse_exchange` reads the
form, `DelegationPolicy.decide` says whether a delegation rule lets this agent act for this
user on this upstream with these scopes, `StsSigner.mint` writes the token. What the token
carries is decided here, never taken from the request: the task id is the STS's (so an
agent cannot name the task its history is kept under), the audience is one upstream, the
scopes at most the rule's and, down a chain, at most the subject token's.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import jwt
from cel_expr_python import cel
from cel_expr_python.ext import ext_math, ext_strings
from cryptography.hazmat.primitives.asymmetric import ed25519

from agentproxy.config.model import SCOPE_TOKEN, Delegation, Issuer, StsSettings, Upstream
from agentproxy.core import Principal, is_safe_identifier, plain
from agentproxy.errors import Unauthenticated, Unavailable
from agentproxy.identity.keys import (
    PrivateKey,
    PublicKey,
    load_private_key,
    public_jwk,
    signing_algorithm,
    thumbprint,
)
from agentproxy.identity.principal import claim_at
from agentproxy.identity.revocations import RevocationList

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
# Token type URIs (RFC 8693 §3), not secrets.
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
JWT_TOKEN = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"  # noqa: S105
CLIENT_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Every token we verify is a JWT; an opaque access token cannot be verified here.
INPUT_TOKEN_TYPES = frozenset({ACCESS_TOKEN, JWT_TOKEN, ID_TOKEN})
ISSUED_TOKEN_TYPES = frozenset({ACCESS_TOKEN, JWT_TOKEN})

_SINGLE = (
    "grant_type",
    "subject_token",
    "subject_token_type",
    "actor_token",
    "actor_token_type",
    "requested_token_type",
    "scope",
    "client_assertion",
    "client_assertion_type",
    "client_id",
)
_KNOWN = frozenset((*_SINGLE, "resource", "audience"))
MAX_SCOPES = 64


class OAuthError(Exception):
    """An RFC 6749 §5.2 error: `error` is the code a client branches on, `description` says
    what to change. 400, but 401 for `invalid_client` (§5.2)."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description

    @property
    def status(self) -> int:
        return 401 if self.error == "invalid_client" else 400

    def to_json(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


@dataclass(frozen=True, slots=True)
class ExchangeRequest:
    """A token exchange request, checked for form. `actor_token` is the agent's own
    credential (`actor_token`, or an RFC 7523 `client_assertion`); without one the subject
    is the agent itself. `scopes` is None when the client asked for none."""

    subject_token: str
    actor_token: str | None
    target: str
    scopes: tuple[str, ...] | None


def parse_exchange(form: Mapping[str, Sequence[str]]) -> ExchangeRequest:
    """Reads an RFC 8693 §2.1 request. Raises OAuthError (`unsupported_grant_type`,
    `invalid_request`, `invalid_target`, `invalid_scope`, `invalid_client`)."""
    for name, values in form.items():
        if name in _SINGLE and len(values) > 1:
            # RFC 6749 §3.2: request parameters must not be included more than once.
            raise OAuthError("invalid_request", f"parameter {name!r} is given more than once")
    value = {name: values[0] for name, values in form.items() if name in _KNOWN and values}
    grant = value.get("grant_type")
    if grant != GRANT_TYPE:
        raise OAuthError(
            "unsupported_grant_type",
            f"grant_type must be {GRANT_TYPE} (this endpoint only exchanges tokens)",
        )
    subject = value.get("subject_token")
    if not subject:
        raise OAuthError("invalid_request", "subject_token is required")
    _check_type(value.get("subject_token_type"), "subject_token_type", INPUT_TOKEN_TYPES)
    actor = value.get("actor_token")
    assertion = value.get("client_assertion")
    if actor is not None:
        _check_type(value.get("actor_token_type"), "actor_token_type", INPUT_TOKEN_TYPES)
    elif "actor_token_type" in value:
        raise OAuthError("invalid_request", "actor_token_type is given without actor_token")
    if assertion is not None:
        if value.get("client_assertion_type") != CLIENT_ASSERTION:
            raise OAuthError(
                "invalid_client", f"client_assertion_type must be {CLIENT_ASSERTION} (RFC 7523)"
            )
        if actor is not None:
            raise OAuthError(
                "invalid_request",
                "give the agent's credential once: actor_token or client_assertion, not both",
            )
        actor = assertion
    requested = value.get("requested_token_type")
    if requested is not None and requested not in ISSUED_TOKEN_TYPES:
        raise OAuthError(
            "invalid_request", f"requested_token_type must be {ACCESS_TOKEN} (or {JWT_TOKEN})"
        )
    targets = [*form.get("audience", ()), *form.get("resource", ())]
    if len(targets) != 1 or not targets[0]:
        raise OAuthError(
            "invalid_target",
            "name exactly one upstream in audience (its name) or resource (its URI):"
            " an issued token is for one upstream",
        )
    return ExchangeRequest(subject, actor, targets[0], _scopes(value.get("scope")))


def _check_type(given: str | None, name: str, allowed: frozenset[str]) -> None:
    if given is None:
        raise OAuthError("invalid_request", f"{name} is required")
    if given not in allowed:
        raise OAuthError(
            "invalid_request", f"{name} {given!r} is not a JWT type (use {ACCESS_TOKEN})"
        )


def _scopes(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    scopes = tuple(dict.fromkeys(text.split(" ")))
    if len(scopes) > MAX_SCOPES or not all(SCOPE_TOKEN.fullmatch(s) for s in scopes):
        raise OAuthError("invalid_scope", "scope must be space-separated scope tokens (RFC 6749)")
    return scopes


# --- delegation policy -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grant:
    """What the token will carry: who acts (and earlier actors, the earliest first), for
    whom (None: the agent for itself), for which upstream, with which scopes, how long."""

    rule: str
    agent: str
    user: str | None
    chain: tuple[str, ...]
    upstream: str
    audience: str
    scopes: tuple[str, ...]
    ttl: float
    roles: tuple[str, ...]
    parent_task: str | None


@dataclass(frozen=True, slots=True)
class Parties:
    """The verified parties of an exchange: the agent acting now and the token it acts on.
    `subject` is the user's token (or an earlier delegation); without an actor token the
    subject is the agent's own credential."""

    actor: Principal | None
    subject: Principal
    own_issuer: str
    user_claim: str

    def acting(self) -> tuple[str, Principal]:
        """The agent acting now and its principal."""
        principal = self.actor if self.actor is not None else self.subject
        return principal.agent, principal

    def user_and_chain(self) -> tuple[str | None, tuple[str, ...], Principal | None]:
        """The user served, the actors before this one (earliest first) and the earlier
        delegation the subject is (our own token with `act`), if it is one.
        Raises OAuthError for a subject that names no usable user."""
        actor, subject = self.actor, self.subject
        if actor is None:
            if subject.acting_for is not None:
                raise OAuthError(
                    "invalid_request",
                    "a delegated subject_token needs the next agent's actor_token",
                )
            return None, (), None
        if actor.acting_for is not None:
            raise OAuthError(
                "invalid_grant",
                "the actor_token acts for someone: it must be the agent's own credential",
            )
        if subject.acting_for is not None:
            if subject.issuer != self.own_issuer:
                raise OAuthError(
                    "invalid_grant",
                    "a subject_token with an act chain is taken only from this STS",
                )
            return subject.acting_for, (*subject.chain, subject.agent), subject
        user = claim_at(subject.claims, self.user_claim)
        if not isinstance(user, str) or not is_safe_identifier(user):
            raise OAuthError(
                "invalid_grant",
                f"the subject_token's {self.user_claim!r} claim does not name a user"
                " (sts.user_claim)",
            )
        return user, (), None


_DELEGATION_ENV = cel.NewEnv(
    variables={
        "actor": cel.Type.DYN,
        "subject": cel.Type.DYN,
        "user": cel.Type.DYN,
        "audience": cel.Type.STRING,
        "scopes": cel.Type.DYN,
        "now": cel.Type.TIMESTAMP,
    },
    extensions=[ext_strings.ExtStrings(), ext_math.ExtMath()],
)


def compile_condition(source: str) -> cel.Expression:
    """Raises ValueError with the CEL compiler's message."""
    try:
        return _DELEGATION_ENV.compile(source)
    except Exception as exc:  # cel-cpp raises its own status errors
        raise ValueError(str(exc).splitlines()[0] if str(exc) else "invalid CEL") from None


@dataclass(frozen=True, slots=True)
class _Rule:
    spec: Delegation
    condition: cel.Expression | None

    def covers_agent(self, agent: str, roles: frozenset[str]) -> bool:
        return any(_matches(entry, agent, roles) for entry in self.spec.agents)

    def covers_user(self, user: str | None) -> bool:
        users = self.spec.users
        if user is None:
            return users is None
        return users is not None and any(_glob(entry, user) for entry in users)


def _matches(entry: str, agent: str, roles: frozenset[str]) -> bool:
    if entry.startswith("role:"):
        return entry[5:] in roles
    return _glob(entry, agent)


def _glob(entry: str, value: str) -> bool:
    if entry == "*":
        return True
    if "*" not in entry:
        return entry == value
    # `*` alone is the only wildcard: ids hold `?`, `[` and `:` (system:serviceaccount:ns:x).
    head, *middle, tail = entry.split("*")
    if not value.startswith(head) or not value.endswith(tail) or len(value) < len(head + tail):
        return False
    at, end = len(head), len(value) - len(tail)
    for part in middle:
        found = value.find(part, at, end)
        if found < 0:
            return False
        at = found + len(part)
    return True


def target_of(target: str, upstreams: Sequence[Upstream]) -> tuple[str, str]:
    """The upstream an exchange's `audience` or `resource` names, and the `aud` its token
    carries: an upstream's name, or one of its `audiences` (its RFC 8707 resource URIs).
    Raises OAuthError (`invalid_target`)."""
    for upstream in upstreams:
        if target == upstream.name:
            own = upstream_audiences(upstream)
            return upstream.name, own[0] if own else upstream.name
        if target in upstream_audiences(upstream):
            return upstream.name, target
    raise OAuthError("invalid_target", f"{target!r} names no upstream of this proxy")


def upstream_audiences(upstream: Upstream) -> tuple[str, ...]:
    """The resource URIs an upstream is known by (`upstreams[].audiences`), if any."""
    return upstream.audiences


class DelegationPolicy:
    """The delegation rules of `sts.delegation_files`, compiled; the first rule that lets the
    exchange through decides it."""

    def __init__(self, settings: StsSettings, upstreams: Sequence[Upstream]) -> None:
        """Raises ValueError naming the rule whose condition does not compile."""
        rules = []
        for spec in settings.delegations:
            try:
                condition = compile_condition(spec.when) if spec.when else None
            except ValueError as exc:
                raise ValueError(f"{spec.position}: delegation {spec.id}.when: {exc}") from None
            rules.append(_Rule(spec, condition))
        self._rules = tuple(rules)
        self._upstreams = tuple(upstreams)
        self._ttl = settings.ttl

    def decide(self, parties: Parties, request: ExchangeRequest, now: float) -> Grant:
        """The grant for this exchange. Raises OAuthError saying, rule by rule, why none
        applies: `invalid_target` when a rule covers the agent and user but not the
        upstream, `invalid_scope` when one covers the upstream but not the scopes, else
        `unauthorized_client`."""
        agent, principal = parties.acting()
        user, earlier, delegated = parties.user_and_chain()
        upstream, audience = target_of(request.target, self._upstreams)
        held: frozenset[str] | None = None
        if delegated is not None:
            # A delegation passes on only what it holds: its upstream and at most its scopes.
            if audience not in _audiences(delegated.claims):
                raise OAuthError(
                    "invalid_target",
                    "a delegated subject_token is passed on only for its own audience",
                )
            held = delegated.scopes  # read as every token's are (principal.scopes)
        depth = len(earlier) + (1 if user is not None else 0)
        reasons: list[str] = []
        error = "unauthorized_client"
        for rule in self._rules:
            spec = rule.spec
            if not rule.covers_agent(agent, principal.roles):
                continue
            if not rule.covers_user(user):
                reasons.append(
                    f"{spec.id}: not for "
                    + (f"acting for user {user}" if user is not None else "the agent alone")
                )
                continue
            if upstream not in spec.audiences:
                reasons.append(f"{spec.id}: not for upstream {upstream}")
                error = "invalid_target" if error == "unauthorized_client" else error
                continue
            allowed = set(spec.scopes) if held is None else set(spec.scopes) & held
            scopes = (
                request.scopes
                if request.scopes is not None
                else tuple(s for s in spec.scopes if s in allowed)
            )
            extra = [s for s in scopes if s not in allowed]
            if extra:
                reasons.append(f"{spec.id}: does not grant {' '.join(extra)}")
                error = "invalid_scope"
                continue
            if depth > spec.max_chain:
                reasons.append(f"{spec.id}: a chain of {depth} actors is over max_chain")
                continue
            if rule.condition is not None and not _holds(
                rule.condition, parties, user, upstream, scopes, now
            ):
                reasons.append(f"{spec.id}: its when condition is false")
                continue
            return Grant(
                rule=spec.id,
                agent=agent,
                user=user,
                chain=earlier,
                upstream=upstream,
                audience=audience,
                scopes=scopes,
                ttl=min(spec.ttl or self._ttl, self._ttl),
                roles=tuple(sorted(principal.roles)),
                parent_task=delegated.task if delegated is not None else parties.subject.task,
            )
        who = f"agent {agent}" + (f" acting for {user}" if user is not None else "")
        detail = "; ".join(reasons[:8]) if reasons else "no delegation rule names this agent"
        raise OAuthError(error, f"no delegation lets {who} on {upstream}: {detail}")


def _audiences(claims: Mapping[str, Any]) -> tuple[str, ...]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return (aud,)
    return tuple(a for a in aud if isinstance(a, str)) if isinstance(aud, list) else ()


def _holds(
    condition: cel.Expression,
    parties: Parties,
    user: str | None,
    upstream: str,
    scopes: tuple[str, ...],
    now: float,
) -> bool:
    """Whether a rule's condition is true; an error or a non-boolean is false (closed)."""
    data = {
        "actor": _view(parties.actor or parties.subject),
        "subject": _view(parties.subject),
        "user": user,
        "audience": upstream,
        "scopes": list(scopes),
        "now": datetime.fromtimestamp(now, UTC),
    }
    try:
        result = condition.eval(data=data)
    except Exception:  # cel-cpp raises on values it cannot convert
        return False
    return result.value() is True


def _view(principal: Principal) -> dict[str, Any]:
    return {
        "agent": principal.agent,
        "user": principal.acting_for,
        "chain": list(principal.chain),
        "roles": sorted(principal.roles),
        "claims": plain(principal.claims),
        "issuer": principal.issuer,
    }


# --- the issued tokens -------------------------------------------------------------------

# Ephemeral keys by issuer, for the process's life: a reload rebuilds the runtime, and tokens
# issued before it must keep verifying.
_EPHEMERAL: dict[str, ed25519.Ed25519PrivateKey] = {}


class StsSigner:
    """Signs issued tokens; its public key is published in the proxy's JWKS, and the proxy's
    own verifier trusts it (`trusted_issuer`)."""

    def __init__(self, key: PrivateKey, settings: StsSettings) -> None:
        self.algorithm = signing_algorithm(key)
        self._key = key
        self.settings = settings
        self._public_jwk = public_jwk(key.public_key())
        self.kid = thumbprint(self._public_jwk)

    @classmethod
    def load(cls, settings: StsSettings) -> StsSigner:
        """Raises ValueError naming the file if it cannot be read or holds no signing key."""
        path = settings.signing_key_file
        if path is None:
            key = _EPHEMERAL.setdefault(settings.issuer, ed25519.Ed25519PrivateKey.generate())
            return cls(key, settings)
        return cls(_read_key(path), settings)

    @property
    def public_key(self) -> PublicKey:
        return self._key.public_key()

    def jwk(self) -> dict[str, Any]:
        return {**self._public_jwk, "kid": self.kid, "alg": self.algorithm, "use": "sig"}

    def trusted_issuer(self, upstreams: Sequence[Upstream]) -> Issuer:
        """The proxy's own issuer, as its verifier trusts it: tokens for any upstream (each
        call checks the token names the upstream called), with the claim names it writes."""
        audiences = sorted({a for u in upstreams for a in (u.name, *upstream_audiences(u))})
        return Issuer(
            issuer=self.settings.issuer,
            audiences=tuple(audiences) or ("-",),
            algorithms=(self.algorithm,),
        )

    def mint(self, grant: Grant, now: float) -> tuple[str, dict[str, Any]]:
        """The signed token for `grant` at `now`, and its claims (for the record)."""
        issued = int(now)
        claims: dict[str, Any] = {
            "iss": self.settings.issuer,
            "sub": grant.user if grant.user is not None else grant.agent,
            "aud": grant.audience,
            "iat": issued,
            "nbf": issued,
            "exp": int(now + grant.ttl),
            "jti": str(uuid.uuid4()),
            "client_id": grant.agent,
            "task": str(uuid.uuid4()),
            "delegation": grant.rule,
        }
        if grant.user is not None:
            act: dict[str, Any] = {"sub": grant.agent}
            inner = act
            for earlier in reversed(grant.chain):
                inner["act"] = {"sub": earlier}
                inner = inner["act"]
            claims["act"] = act
        if grant.scopes:
            claims["scope"] = " ".join(grant.scopes)
        if grant.roles:
            claims["roles"] = list(grant.roles)
        if grant.parent_task is not None:
            claims["parent_task"] = grant.parent_task
        token = jwt.encode(claims, self._key, algorithm=self.algorithm, headers={"kid": self.kid})
        return token, claims


def _read_key(path: Path) -> PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the STS signing key: {exc}") from exc
    return load_private_key(data, path)


# --- the endpoint's shell ----------------------------------------------------------------


class Verifier(Protocol):
    async def verify(self, token: str, now: float) -> Principal:
        """Raises Unauthenticated, Unavailable."""
        ...


@dataclass(frozen=True, slots=True)
class Exchanged:
    """An issued token: the RFC 8693 §2.2.1 response, and the record of it (no token)."""

    response: dict[str, Any]
    record: dict[str, Any]


class ExchangeRefused(Exception):
    """An exchange refused: the OAuth error, and the record of it."""

    def __init__(self, error: OAuthError, record: dict[str, Any]) -> None:
        super().__init__(error.description)
        self.error = error
        self.record = record


async def exchange(
    form: Mapping[str, Sequence[str]],
    *,
    signer: StsSigner,
    delegations: DelegationPolicy,
    verifier: Verifier,
    revocations: RevocationList,
    now: float,
) -> Exchanged:
    """One token exchange, start to end. Raises ExchangeRefused, or `Unavailable` when an
    issuer's keys cannot be fetched or the deny list is stale (never issue on a guess)."""
    record: dict[str, Any] = {"kind": "token_exchange"}
    try:
        request = parse_exchange(form)
        record["target"] = request.target
        subject = await _verified(verifier, request.subject_token, "subject_token", now)
        actor = None
        if request.actor_token is not None:
            actor = await _verified(verifier, request.actor_token, "actor_token", now)
        parties = Parties(actor, subject, signer.settings.issuer, signer.settings.user_claim)
        record["agent"] = parties.acting()[0]
        if not revocations.fresh():
            raise Unavailable(
                "the revocation list could not be refreshed: no token is issued meanwhile",
                component="store",
            )
        for principal in (subject, actor):
            revoked = revocations.check(principal, now) if principal is not None else None
            if revoked is not None:
                raise OAuthError("invalid_grant", f"{revoked.kind} {revoked.subject} is revoked")
        grant = delegations.decide(parties, request, now)
        record.update(rule=grant.rule, user=grant.user, upstream=grant.upstream)
        if grant.user is not None:
            revoked = revocations.check_user(grant.user, now)
            if revoked is not None:
                raise OAuthError("invalid_grant", f"user {grant.user} is revoked")
    except OAuthError as exc:
        record.update(outcome=exc.error, reason=exc.description)
        raise ExchangeRefused(exc, record) from None
    token, claims = signer.mint(grant, now)
    record.update(
        outcome="issued",
        actors=[*grant.chain, grant.agent],
        scopes=list(grant.scopes),
        jti=claims["jti"],
        task=claims["task"],
        parent_task=claims.get("parent_task"),
        expires_at=claims["exp"],
    )
    response: dict[str, Any] = {
        "access_token": token,
        "issued_token_type": ACCESS_TOKEN,
        "token_type": "Bearer",
        "expires_in": claims["exp"] - claims["iat"],
    }
    if grant.scopes:
        response["scope"] = " ".join(grant.scopes)
    return Exchanged(response, record)


async def _verified(verifier: Verifier, token: str, name: str, now: float) -> Principal:
    try:
        return await verifier.verify(token, now)
    except Unauthenticated as exc:
        # RFC 8693 §2.2.2: an invalid subject or actor token is `invalid_request`.
        raise OAuthError("invalid_request", f"{name}: {exc.detail}") from None
