"""identify: who is calling, and may they call at all (the token, the deny list, the task)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from agentproxy.clock import Clock, rfc3339
from agentproxy.core import Call, Principal
from agentproxy.errors import BadRequest, Denied, MissingCredential, Unauthenticated
from agentproxy.identity.revocations import RevocationList
from agentproxy.identity.verifier import TokenVerifier
from agentproxy.proxy.pipeline import Exchange


class Identify:
    """Verifies the bearer token, checks the deny list and settles the task id.

    The task comes from the token's task claim; only if it has none, from the agent's own
    declaration (`X-Agentproxy-Task`), already validated by the protocol adapter.
    """

    __slots__ = (
        "_bound",
        "_clock",
        "_from_header",
        "_from_token",
        "_issuer_audiences",
        "_own_issuer",
        "_resources",
        "_revocations",
        "_verifier",
    )

    def __init__(
        self,
        verifier: TokenVerifier,
        revocations: RevocationList,
        clock: Clock,
        *,
        task_from: tuple[str, ...] = ("token", "header"),
        own_issuer: str | None = None,
        bound: Mapping[str, frozenset[str]] | None = None,
        resources: Mapping[str, frozenset[str]] | None = None,
        issuer_audiences: Mapping[str, frozenset[str]] | None = None,
    ) -> None:
        """`task_from`: where a task id may come from (`identity.task_from`). `own_issuer`:
        the proxy's STS, whose tokens are each for one upstream: `bound` gives the `aud`
        values that name each upstream (its name and its resource URIs). `resources`: the
        upstreams that require their own resource URIs in `aud` (RFC 8707 `audiences`);
        on the others a token must name its issuer's `audiences` (`issuer_audiences`)."""
        self._own_issuer = own_issuer
        self._bound = bound or {}
        self._resources = resources or {}
        self._issuer_audiences = issuer_audiences or {}
        self._verifier = verifier
        self._revocations = revocations
        self._clock = clock
        self._from_token = "token" in task_from
        self._from_header = "header" in task_from

    async def __call__(self, call: Call, exchange: Exchange) -> None:
        """Raises MissingCredential, Unauthenticated (a bad or revoked token), Denied (a
        revoked agent), BadRequest (a declared task where only the token may name it) or
        Unavailable (the issuer's keys cannot be fetched)."""
        started = self._clock.monotonic()
        if call.bearer is None:
            raise MissingCredential()
        principal = await self._verifier.verify(call.bearer, call.now)
        accepted = self._accepted(principal.issuer, call.upstream)
        if accepted is not None and not _names_any(principal, accepted):
            # RFC 8707: a token for one upstream (the STS's, or one naming only another
            # upstream's resource URI) is no key to another.
            raise Unauthenticated(
                f"token is not for upstream {call.upstream}: its aud must name "
                f"{' or '.join(sorted(accepted))} (RFC 8707)"
            )
        call.principal = principal
        if call.declared_task is not None and not self._from_header:
            raise BadRequest(
                "X-Agentproxy-Task is not accepted here: the task id comes from the token "
                "(identity.task_from)"
            )
        if call.declared_parent is not None and not self._from_header:
            raise BadRequest(
                "X-Agentproxy-Parent-Task is not accepted here: the task id comes from the token "
                "(identity.task_from)"
            )
        from_token = principal.task if self._from_token else None
        call.task = from_token or call.declared_task
        if from_token is not None:
            # A task the token names has the parent the token names: an agent cannot graft
            # the identity provider's (or the STS's) task onto another tree.
            call.parent_task = principal.parent_task
            call.parent_source = "token" if principal.parent_task is not None else None
        elif call.task is not None and call.declared_parent is not None:
            # A declared task's parent is declared too (an orchestrator's header): recorded
            # as such, so the tree can tell the agent's word from the issuer's.
            call.parent_task = call.declared_parent
            call.parent_source = "header"
        revocations = self._revocations
        if not revocations.fresh():
            call.store_error = "revocations could not be refreshed"
        revoked = revocations.check(principal, call.now)
        if revoked is not None:
            until = "" if revoked.until == math.inf else f" until {rfc3339(revoked.until)}"
            if revoked.kind == "token":
                raise Unauthenticated(f"token revoked{until}")
            raise Denied(
                f"{revoked.kind} {revoked.subject} is revoked{until}"
                + (f": {revoked.reason}" if revoked.reason else "")
            )
        call.decision_seconds = self._clock.monotonic() - started

    def _accepted(self, issuer: str, upstream: str) -> frozenset[str] | None:
        """The `aud` values that open `upstream` to a token of `issuer`; None where the
        verifier's own audience check is all there is (no upstream names a resource)."""
        if issuer == self._own_issuer:
            return self._bound.get(upstream, frozenset())
        if not self._resources:
            return None
        return self._resources.get(upstream) or self._issuer_audiences.get(issuer, frozenset())


def _names_any(principal: Principal, names: frozenset[str]) -> bool:
    aud = principal.claims.get("aud")
    audiences = (aud,) if isinstance(aud, str) else aud if isinstance(aud, list) else ()
    return any(a in names for a in audiences)
