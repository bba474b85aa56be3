"""CORS for browser clients (the MCP Inspector, web agents): the Fetch standard's preflight and
response headers, for an upstream with `cors: {allow_origins: [...]}`.

Pure: headers in, headers out. A preflight (`OPTIONS` with `Origin` and
`Access-Control-Request-Method`, Fetch §4.8) never carries `Authorization`, so the proxy
answers it itself — 204 for a listed origin, 403 otherwise — and never passes it on: nothing
reaches an upstream that was not decided. `Access-Control-Allow-Credentials` is never sent:
agents authenticate with a bearer token set by the page, not with cookies, so no ambient
credential ever rides a cross-origin request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from agentproxy.config.model import Cors

__all__ = [
    "ALLOW_HEADERS",
    "EXPOSE_HEADERS",
    "MAX_AGE",
    "answer_headers",
    "is_allowed",
    "is_preflight",
    "preflight_headers",
    "public_preflight_headers",
]

# What an MCP client sets (Streamable HTTP: the session, the protocol version, the 2026-07-28
# routing headers, Last-Event-ID to resume a stream) and the proxy reads (task headers, W3C
# trace context); Content-Type because application/json is not CORS-safelisted.
ALLOW_HEADERS: Final = (
    "Authorization",
    "Content-Type",
    "Mcp-Session-Id",
    "Mcp-Protocol-Version",
    "Mcp-Method",
    "Mcp-Name",
    "Last-Event-ID",
    "X-Agentproxy-Task",
    "X-Agentproxy-Parent-Task",
    "traceparent",
    "tracestate",
)
# What a browser client must read: the session it was given, the challenge of a 401/403
# (RFC 9728 discovery starts there), when to retry a limit, what a budget has left.
EXPOSE_HEADERS: Final = (
    "Mcp-Session-Id",
    "Mcp-Protocol-Version",
    "WWW-Authenticate",
    "Retry-After",
    "X-Agentproxy-Budget-Remaining",
)
# How long a browser may reuse a preflight answer; a reload's change of origins is seen
# within it (Chromium caps the cache at 2 h, Firefox at 24 h).
MAX_AGE: Final = 600

_METHODS: Final[Mapping[str, str]] = {
    "mcp": "GET, POST, DELETE",
    "llm": "GET, POST",
    "http": "GET, HEAD, POST, PUT, PATCH, DELETE",
}


def is_preflight(method: str, origin: str | None, request_method: str | None) -> bool:
    """A CORS preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`."""
    return method == "OPTIONS" and origin is not None and request_method is not None


def is_allowed(cors: Cors, origin: str) -> bool:
    """The origin is listed, exactly: browsers serialize it (RFC 6454 §6.1), and the loader
    only accepts origins in that form."""
    return origin in cors.allow_origins


def preflight_headers(protocol: str, origin: str) -> tuple[tuple[str, str], ...]:
    """The 204 answer to a preflight from an allowed `origin`."""
    return (
        ("Access-Control-Allow-Origin", origin),
        ("Access-Control-Allow-Methods", _METHODS.get(protocol, _METHODS["http"])),
        ("Access-Control-Allow-Headers", ", ".join(ALLOW_HEADERS)),
        ("Access-Control-Max-Age", str(MAX_AGE)),
        ("Vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
    )


def public_preflight_headers() -> tuple[tuple[str, str], ...]:
    """The 204 answer to a preflight for a public document (RFC 9728 protected resource
    metadata, readable from any origin and carrying no credential): a browser client's
    discovery request carries `MCP-Protocol-Version`, which is not CORS-safelisted."""
    return (
        ("Access-Control-Allow-Origin", "*"),
        ("Access-Control-Allow-Methods", "GET, HEAD"),
        ("Access-Control-Allow-Headers", "MCP-Protocol-Version"),
        ("Access-Control-Max-Age", str(MAX_AGE)),
    )


def answer_headers(cors: Cors, origin: str | None) -> tuple[tuple[str, str], ...]:
    """The CORS headers of an actual answer (forwarded or refused, the proxy's 401 and 403
    included): the origin echoed and the headers exposed for a listed origin, and always
    `Vary: Origin`, since the answer differs by origin (a shared cache must not serve one
    origin's answer to another)."""
    if origin is None or not is_allowed(cors, origin):
        return (("Vary", "Origin"),)
    return (
        ("Access-Control-Allow-Origin", origin),
        ("Access-Control-Expose-Headers", ", ".join(EXPOSE_HEADERS)),
        ("Vary", "Origin"),
    )
