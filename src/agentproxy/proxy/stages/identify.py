"""identify: who is calling, and may they call at all (the token, the deny list, the task)."""

from __future__ import annotations

import math

from agentproxy.clock import Clock, rfc3339
from agentproxy.core import Call
from agentproxy.errors import Denied, MissingCredential, Unauthenticated
from agentproxy.identity.revocations import RevocationList
from agentproxy.identity.verifier import TokenVerifier
from agentproxy.proxy.pipeline import Exchange


class Identify:
    """Verifies the bearer token, checks the deny list and settles the task id.

    The task comes from the token's task claim; only if it has none, from the agent's own
    declaration (`X-Agentproxy-Task`), already validated by the protocol adapter.
    """

    __slots__ = ("_clock", "_revocations", "_verifier")

    def __init__(self, verifier: TokenVerifier, revocations: RevocationList, clock: Clock) -> None:
        self._verifier = verifier
        self._revocations = revocations
        self._clock = clock

    async def __call__(self, call: Call, exchange: Exchange) -> None:
        """Raises MissingCredential, Unauthenticated (a bad or revoked token), Denied (a
        revoked agent) or Unavailable (the issuer's keys cannot be fetched)."""
        started = self._clock.monotonic()
        if call.bearer is None:
            raise MissingCredential()
        principal = await self._verifier.verify(call.bearer, call.now)
        call.principal = principal
        call.task = principal.task or call.declared_task
        revocations = self._revocations
        if not revocations.fresh():
            call.store_error = "revocations could not be refreshed"
        revoked = revocations.check(principal, call.now)
        if revoked is not None:
            until = "" if revoked.until == math.inf else f" until {rfc3339(revoked.until)}"
            if revoked.kind == "token":
                raise Unauthenticated(f"token revoked{until}")
            raise Denied(
                f"agent {principal.agent} is revoked{until}"
                + (f": {revoked.reason}" if revoked.reason else "")
            )
        call.decision_seconds = self._clock.monotonic() - started
