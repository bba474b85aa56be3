"""pins: an MCP tool whose definition changed since it was pinned is refused ("rug pull")."""

from __future__ import annotations

from collections.abc import Set

from agentproxy.core import Call, Decision, Effect
from agentproxy.errors import Denied
from agentproxy.proxy.pins import ToolPins
from agentproxy.proxy.pipeline import Exchange

# The rule a pin refusal is attributed to, in decisions, metrics and the decision log.
PIN_RULE = "pin-tools"


class Pins:
    """Under `pin_tools: enforce`, a `tools/call` of a changed tool is denied until an
    operator accepts the new definition. The refusal is a policy decision (a `deny`, counted
    and logged as one), whatever the proxy's mode: the upstream's setting asks for it."""

    __slots__ = ("_enforced", "_pins", "_policy_version")

    def __init__(self, pins: ToolPins, enforced: Set[str], policy_version: str) -> None:
        """`enforced`: the names of the MCP upstreams with `pin_tools: enforce`."""
        self._pins = pins
        self._enforced = frozenset(enforced)
        self._policy_version = policy_version

    async def __call__(self, call: Call, exchange: Exchange) -> None:
        if call.upstream not in self._enforced:
            return
        for index, action in enumerate((call.action, *call.batch)):
            if action.operation == "tools/call" and self._pins.is_changed(
                call.upstream, action.target
            ):
                reason = (
                    f"tool {action.target!r} changed since it was pinned; an operator must "
                    "accept the new definition (agentproxy tools accept)"
                )
                call.refused_at = index
                call.enforced = True
                call.decision = Decision(Effect.DENY, PIN_RULE, reason, self._policy_version)
                call.refusal = Denied(reason, rule=PIN_RULE)
                return
