"""Who started each MCP session: a session id (`Mcp-Session-Id`) is no credential, yet it is
all an MCP server asks for to replay a stream (`GET` with `Last-Event-ID`) or end a session
(`DELETE`). The proxy binds each id the upstream issues to the principal whose call it
answered, and refuses it to any other (MCP security best practices, "Session Hijacking":
bind session ids to the user).

Kept in this process, like tool pins: a session this replica did not see start is not
known here and is left to the upstream.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final

from agentproxy.core import Principal

Owner = tuple[str, str, str, tuple[str, ...]]

_MAX_SESSIONS: Final = 100_000


def owner_of(principal: Principal) -> Owner:
    """Everything that says who is calling: issuer, agent, the user it acts for, the chain."""
    return (principal.issuer, principal.agent, principal.acting_for or "", principal.chain)


@dataclass(slots=True)
class SessionOwners:
    """(upstream, session id) → its owner, the most recently used last; bounded."""

    _owners: OrderedDict[tuple[str, str], Owner] = field(default_factory=OrderedDict)

    def bind(self, upstream: str, session: str, principal: Principal) -> None:
        """Records the owner of a session the upstream issued; the first owner stays."""
        key = (upstream, session)
        if key not in self._owners:
            self._owners[key] = owner_of(principal)
            while len(self._owners) > _MAX_SESSIONS:
                self._owners.popitem(last=False)
        self._owners.move_to_end(key)

    def is_another_principals(self, upstream: str, session: str, principal: Principal) -> bool:
        """The session was started by someone else (False when it is unknown here)."""
        owner = self._owners.get((upstream, session))
        return owner is not None and owner != owner_of(principal)

    def end(self, upstream: str, session: str) -> None:
        self._owners.pop((upstream, session), None)
