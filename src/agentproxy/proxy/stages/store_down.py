"""What a call gets when the store cannot answer: fail closed, or `on_error: allow_cached`."""

from __future__ import annotations

from typing import Literal

from agentproxy.core import Call, Effect
from agentproxy.errors import Unavailable

OnError = Literal["deny", "allow_cached"]


def degraded(call: Call, on_error: OnError) -> None:
    """The store could not answer. A deny stands (refusing is safe whatever the store would
    have said); `on_error: allow_cached` lets a memoized allow through; every other allow is
    refused with 503 (fail closed). Raises Unavailable. The store's own error text goes to
    the operator's log, never to the agent."""
    decision = call.decision
    if decision is not None and decision.effect is not Effect.ALLOW:
        return
    if on_error == "allow_cached" and call.memo_hit and decision is not None:
        return
    raise Unavailable("the decision store is unavailable; try again shortly", component="store")
