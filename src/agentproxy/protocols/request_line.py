"""A call written as one line, as `explain`, `policy test` and `Authorizer.Check` take it:

    GET /v1/employees/42?fields=name      an HTTP request line (method, target; a body as args)
    grpc /package.Service/Method          a gRPC method (arguments as JSON)
    mcp tools/call search                 an MCP method and what it names (arguments as JSON)

described by the same adapters that describe the wire, so what is explained is what would be
served. Pure: text in, `Action` out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Final

from agentproxy.core import Action
from agentproxy.errors import BadRequest
from agentproxy.protocols import grpc, http, mcp
from agentproxy.protocols.http_body import BodyMode, body_kind, parse_body

__all__ = ["USAGE", "GrpcMethods", "describe_line"]

USAGE: Final = (
    'write the request as "METHOD /path?query", "grpc /package.Service/Method" or '
    '"mcp tools/call <tool>" (with args for gRPC and MCP)'
)

# A body explained or tested is one typed or kept in a file: far below any upstream's cap.
MAX_EXPLAINED_BODY: Final = 8 * 1024 * 1024
# (service, method path) → what the upstream's descriptor set says of it, if anything.
GrpcMethods = Callable[[str, str], grpc.Method | None]


def describe_line(
    line: str,
    args: Mapping[str, Any] | None,
    grpc_methods: GrpcMethods,
    *,
    body: bytes | None = None,
    content_type: str | None = None,
    body_mode: BodyMode = "auto",
    spellings: Mapping[str, frozenset[str]] | None = None,
) -> Action:
    """The action `line` names, with `args` as its arguments (gRPC, MCP), or for HTTP the
    arguments of `body` (JSON unless `content_type` says form), read by the parser the data
    plane reads it with (refusing keys spelled otherwise than `spellings`). Raises BadRequest
    (UnsupportedMediaType, PayloadTooLarge) as the adapter that describes such a call would,
    or when the line is none of the three forms."""
    first, _, rest = line.strip().partition(" ")
    rest = rest.strip()
    if not first or not rest:
        raise BadRequest(USAGE)
    if first == "grpc":
        base = grpc.describe(rest)
        method = grpc_methods(base.operation, base.target)
        values = dict(args or {})
        if method is not None:
            values = grpc.args_from_json(method, values)
        return Action("grpc", base.operation, base.target, args=values, name=base.name)
    if first == "mcp":
        mcp_method, _, name = rest.partition(" ")
        return mcp.describe_call(mcp_method, name.strip(), dict(args or {}))
    action = http.describe(first, rest)[0]
    if body is None or body_mode == "stream":
        return action
    kind = body_kind(body_mode, content_type or "application/json", why="the body given")
    parsed = parse_body(kind, None, body, max_bytes=MAX_EXPLAINED_BODY, spellings=spellings)
    return replace(action, args=parsed.args)
