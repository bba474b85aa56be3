"""describe: what an authenticated caller asks, read from what only it may make us read."""

from __future__ import annotations

from agentproxy.core import Call
from agentproxy.proxy.pipeline import Exchange


class Describe:
    """Lets the shell complete the action from the body (an MCP message names its tool, an
    LLM request its model). Runs after identify: nobody without a valid token makes the proxy
    read a body."""

    __slots__ = ()

    async def __call__(self, call: Call, exchange: Exchange) -> None:
        """Raises Refusal (BadRequest, PayloadTooLarge) for a body that cannot be read
        unambiguously, LimitRefused when the agent already has its share of large bodies
        being read (proxy/offload.py)."""
        await exchange.describe(call)
