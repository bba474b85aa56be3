"""Turn a verified token's claims into a `Principal`: pure, no keys, no clock.

RFC 8693 §4.1: a token with an `act` claim was issued for delegation. Its `sub` is the
subject (the user) and `act.sub` the party acting now; an `act` nested inside `act` names the
actor before that one, and so on. Without `act` the token's agent claim names the agent.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from agentproxy.config.model import SCOPE_TOKEN, ClaimNames
from agentproxy.core import Principal, is_safe_identifier
from agentproxy.errors import Unauthenticated

MAX_ACT_DEPTH = 10

# Task ids travel in headers, logs and policy conditions; keep them to a plain token.
_TASK = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The claim `path` names: a claim of that exact name (Auth0's namespaced
    "https://example.com/roles" holds dots), else a dotted path into nested claims
    (Keycloak's `realm_access.roles`); None where it leads nowhere."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for step in path.split("."):
        if not isinstance(value, Mapping) or step not in value:
            return None
        value = value[step]
    return value


def principal_from_claims(
    claims: Mapping[str, Any], names: ClaimNames, issuer: str, expires_at: float
) -> Principal:
    """Build the principal a verified token names.

    Raises `Unauthenticated` when the claims do not name a well-formed identity: no agent,
    an `act` without a string `sub`, an identifier with control characters or over 256
    characters, `act` nested deeper than `MAX_ACT_DEPTH`, or malformed roles or task. The
    detail says which claim is wrong, never its value.
    """
    if "act" in claims:
        actors = _actors(claims["act"])
        acting_for: str | None = _identifier(claims.get("sub"), "sub")
        agent, chain = actors[0], tuple(reversed(actors[1:]))
    else:
        agent, acting_for, chain = _identifier(claim_at(claims, names.agent), names.agent), None, ()
    jti = claims.get("jti")
    return Principal(
        agent=agent,
        acting_for=acting_for,
        chain=chain,
        roles=_roles(claim_at(claims, names.roles), names.roles),
        claims=MappingProxyType(copy.deepcopy(dict(claims))),
        issuer=issuer,
        token_id=jti if isinstance(jti, str) else None,
        expires_at=expires_at,
        task=_task(claim_at(claims, names.task), names.task),
        parent_task=_task(claim_at(claims, names.parent_task), names.parent_task),
        scopes=_scopes(claims, names.scopes),
    )


def _actors(act: Any) -> list[str]:
    """The actors of an `act` claim, the current one first."""
    actors: list[str] = []
    path = "act"
    while True:
        if not isinstance(act, Mapping):
            raise Unauthenticated(f"claim {path!r} is not an object (RFC 8693 §4.1)")
        if len(actors) == MAX_ACT_DEPTH:
            raise Unauthenticated(f"actor chain is deeper than {MAX_ACT_DEPTH}")
        actors.append(_identifier(act.get("sub"), f"{path}.sub"))
        if "act" not in act:
            return actors
        act = act["act"]
        path += ".act"


def _identifier(value: Any, claim: str) -> str:
    if value is None:
        raise Unauthenticated(f"token has no {claim!r} claim")
    if not isinstance(value, str):
        raise Unauthenticated(f"claim {claim!r} is not a string")
    if not is_safe_identifier(value):
        raise Unauthenticated(
            f"claim {claim!r} is empty, longer than 256 characters or has control characters"
        )
    return value


def _roles(value: Any, claim: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    # RFC 6749 §3.3: an OAuth `scope` is one string of space-delimited tokens.
    roles = value.split() if isinstance(value, str) else value
    if not isinstance(roles, list) or not all(
        isinstance(role, str) and is_safe_identifier(role) for role in roles
    ):
        raise Unauthenticated(
            f"claim {claim!r} must be a list of strings or a space-separated string"
            " of printable roles"
        )
    return frozenset(roles)


def _scopes(claims: Mapping[str, Any], claim: str) -> frozenset[str]:
    """The token's scopes: RFC 8693 §4.2's `scope` (one space-separated string), or a list;
    with the default name, Entra ID's `scp` when there is no `scope`."""
    value = claim_at(claims, claim)
    if value is None and claim == "scope":
        value, claim = claims.get("scp"), "scp"
    if value is None:
        return frozenset()
    scopes = value.split() if isinstance(value, str) else value
    if not isinstance(scopes, list) or not all(
        isinstance(s, str) and SCOPE_TOKEN.fullmatch(s) for s in scopes
    ):
        raise Unauthenticated(
            f"claim {claim!r} must be a space-separated string or a list of scope tokens"
            " (RFC 6749 §3.3)"
        )
    return frozenset(scopes)


def _task(value: Any, claim: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _TASK.fullmatch(value):
        raise Unauthenticated(f"claim {claim!r} must be 1-128 characters of A-Z a-z 0-9 . _ : -")
    return value
