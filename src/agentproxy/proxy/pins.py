"""Tool pinning: defence against an MCP server changing a tool under the agent ("rug pull").

The first definition of each tool seen in a `tools/list` answer is pinned per upstream (a
hash of its name, title, description and schemas). A later, different definition is
reported (metric and log); with `pin_tools: enforce` the changed tool is hidden and refused
until an operator accepts the new definition (`agentproxy tools accept`). Pins live in this
process: every replica pins what it sees, so a fleet reports a change on each replica.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from agentproxy.proxy.sessions import SessionOwners

log = logging.getLogger("agentproxy.pins")

Seen = Literal["new", "same", "changed"]


@dataclass(slots=True)
class ToolPins:
    pinned: dict[tuple[str, str], str] = field(default_factory=dict)
    changed: dict[tuple[str, str], str] = field(default_factory=dict)

    def observe(self, upstream: str, tool: str, fingerprint: str) -> Seen:
        key = (upstream, tool)
        pinned = self.pinned.get(key)
        if pinned is None:
            self.pinned[key] = fingerprint
            return "new"
        if pinned == fingerprint:
            self.changed.pop(key, None)
            return "same"
        if self.changed.get(key) != fingerprint:
            log.warning(
                "MCP upstream %s changed tool %r (pinned %s…, now %s…)",
                upstream,
                tool,
                pinned[:12],
                fingerprint[:12],
            )
        self.changed[key] = fingerprint
        return "changed"

    def is_changed(self, upstream: str, tool: str) -> bool:
        return (upstream, tool) in self.changed

    def accept(self, upstream: str, tool: str) -> str | None:
        """Pins the tool's current definition; the new fingerprint, or None if unchanged."""
        fingerprint = self.changed.pop((upstream, tool), None)
        if fingerprint is not None:
            self.pinned[(upstream, tool)] = fingerprint
            log.warning("tool %r of upstream %s accepted as changed", tool, upstream)
        return fingerprint


@dataclass(slots=True)
class McpState:
    """What MCP exchanges share across calls and reloads: tool pins, how to count a changed
    tool (upstream, tool), and who started each session."""

    pins: ToolPins = field(default_factory=ToolPins)
    sessions: SessionOwners = field(default_factory=SessionOwners)
    on_tool_change: Callable[[str, str], None] | None = None
