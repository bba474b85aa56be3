"""The HTTP data plane: the aiohttp handler in front of the HTTP, MCP and LLM exchanges.

It owns the sockets: it reads the request head, asks the HTTP adapter to describe it, picks
the exchange for the upstream's protocol and runs the current pipeline with it.
"""

from __future__ import annotations

from collections.abc import Callable

from multidict import CIMultiDictProxy

from agentproxy.config.model import Upstream
from agentproxy.core import Action
from agentproxy.errors import BadRequest, CorsRefused, Refusal, Unauthenticated
from agentproxy.protocols import cors
from agentproxy.protocols.http import bearer_token, parse_declared_task
from agentproxy.proxy.http import HttpExchange
from agentproxy.proxy.http_wire import Request, Response, StreamResponse
from agentproxy.proxy.llm import LlmExchange
from agentproxy.proxy.mcp import McpExchange
from agentproxy.proxy.pins import McpState
from agentproxy.proxy.pipeline import Pipeline, start_call
from agentproxy.proxy.runtime import METADATA_PATH
from agentproxy.proxy.upstream import UpstreamClient

UNPARSED = Action("http", "?", "<unparsed>")


class HttpDataPlane:
    def __init__(
        self, current: Callable[[], Pipeline], upstream_client: UpstreamClient, mcp: McpState
    ) -> None:
        """`current`: the pipeline of the snapshot in force (read once per request)."""
        self._current = current
        self._upstream_client = upstream_client
        self._mcp = mcp

    async def handle(self, request: Request) -> StreamResponse:
        pipeline = self._current()
        clock = pipeline.clock
        started = clock.monotonic()
        runtime = pipeline.runtime
        if runtime.metadata_documents and request.raw_path.startswith(METADATA_PATH):
            document = runtime.metadata_documents.get(request.raw_path)
            if document is not None and request.method in ("GET", "HEAD"):
                return metadata_response(document)
            if document is not None and cors.is_preflight(
                request.method,
                request.headers.get("Origin"),
                request.headers.get("Access-Control-Request-Method"),
            ):
                # Public from any origin, like the document itself.
                return _public_preflight()
        headers = request.headers
        action, raw_query, upstream, bearer, declared = UNPARSED, "", None, None, None
        declared_parent: str | None = None
        refusal: Refusal | None = None
        try:
            action, raw_query, upstream = runtime.describe_http(request.method, request.raw_path)
            if is_mcp_endpoint(upstream, action.target) and raw_query:
                # Only the endpoint is decided as MCP, on its JSON-RPC body: a query would
                # reach the server undecided.
                raise BadRequest("an MCP request carries no query string")
            origin = _single(headers, "Origin")
            if cors.is_preflight(
                request.method, origin, headers.get("Access-Control-Request-Method")
            ):
                # Answered here, never forwarded (it carries no token to decide on); refused
                # as a call (recorded) when the origin is not listed.
                return _preflight(upstream, origin)
            listed = upstream.cors if upstream is not None else None
            if listed is not None and origin is not None and not cors.is_allowed(listed, origin):
                # A browser page of another origin (MCP: "validate Origin", DNS rebinding).
                raise CorsRefused(origin_not_listed(upstream, origin))
            authorization = headers.getall("Authorization", [])
            if len(authorization) > 1:
                raise Unauthenticated("more than one Authorization header")
            bearer = bearer_token(authorization[0] if authorization else None)
            tasks = headers.getall("X-Agentproxy-Task", [])
            if len(tasks) > 1:
                raise BadRequest("more than one X-Agentproxy-Task header")
            declared = parse_declared_task(tasks[0] if tasks else None)
            declared_parent = _declared_parent(headers.getall("X-Agentproxy-Parent-Task", []))
        except Refusal as exc:
            refusal = exc
        call = start_call(
            action,
            upstream.name if upstream else "-",
            started=started,
            now=clock.now(),
            bearer=bearer,
            declared_task=declared,
            declared_parent=declared_parent,
            refusal=refusal,
            traceparent=headers.get("traceparent"),
            tracestate=headers.get("tracestate"),
        )
        client = self._upstream_client
        exchange: HttpExchange
        if upstream is not None and upstream.protocol == "llm":
            exchange = LlmExchange(
                request, runtime, upstream, action.target, raw_query, client, clock
            )
        elif upstream is not None and is_mcp_endpoint(upstream, action.target):
            exchange = McpExchange(
                request, runtime, upstream, action.target, raw_query, client, clock, self._mcp
            )
        else:
            # Plain HTTP, and every path of an MCP server but its endpoint (the SDK's
            # custom routes): an ordinary `http:` action, decided as such.
            exchange = HttpExchange(
                request, runtime, upstream, action.target, raw_query, client, clock
            )
        if upstream is not None and upstream.cors is not None:
            exchange.cors_headers = cors.answer_headers(upstream.cors, headers.get("Origin"))
        await pipeline.run(call, exchange)
        response = exchange.response
        exchange.apply_cors(response)  # refusals and answers read whole (listings, shaped)
        return response


def _single(headers: CIMultiDictProxy[str], name: str) -> str | None:
    """The one value of a header, None when absent. Raises BadRequest for two."""
    values = headers.getall(name, [])
    if len(values) > 1:
        raise BadRequest(f"more than one {name} header")
    return values[0] if values else None


def _preflight(upstream: Upstream | None, origin: str | None) -> StreamResponse:
    """The answer to a CORS preflight: 204 for an origin the upstream's `cors:` lists.
    Raises CorsRefused (403, no CORS headers) otherwise: never 401, since a preflight never
    carries a token, and never forwarded."""
    if upstream is None or origin is None:
        raise CorsRefused("a CORS preflight for no upstream")
    if upstream.cors is None:
        raise CorsRefused(
            f"upstream {upstream.name} takes no cross-origin requests from browsers; to allow "
            f'{origin}, add to it: cors: {{allow_origins: ["{origin}"]}}'
        )
    if not cors.is_allowed(upstream.cors, origin):
        raise CorsRefused(origin_not_listed(upstream, origin))
    response = Response(status=204)
    for name, value in cors.preflight_headers(upstream.protocol, origin):
        response.headers.add(name, value)
    response.headers["Server"] = "agentproxy"
    return response


def origin_not_listed(upstream: Upstream | None, origin: str) -> str:
    # The origin is the browser's, not a secret; printable ASCII only, as aiohttp parsed it.
    shown = origin.encode("ascii", "replace").decode("ascii")[:200]
    name = upstream.name if upstream is not None else "-"
    return f"origin {shown} is not in cors.allow_origins of upstream {name}"


def metadata_response(document: bytes) -> Response:
    """A protected resource metadata document (RFC 9728 §3.2): public, without a token, and
    readable by browser clients (the MCP Inspector) from any origin."""
    return Response(
        body=document,
        content_type="application/json",
        headers={
            "Cache-Control": "public, max-age=300",
            "Access-Control-Allow-Origin": "*",
            "Server": "agentproxy",
        },
    )


def _public_preflight() -> Response:
    response = Response(status=204)
    for name, value in cors.public_preflight_headers():
        response.headers.add(name, value)
    response.headers["Server"] = "agentproxy"
    return response


def is_mcp_endpoint(upstream: Upstream, path: str) -> bool:
    return upstream.protocol == "mcp" and path == upstream.endpoint


def _declared_parent(values: list[str]) -> str | None:
    """The orchestrator's `X-Agentproxy-Parent-Task`: the task that delegated the one this
    call declares (the same grammar as `X-Agentproxy-Task`). Raises BadRequest for more than
    one, or a malformed one."""
    if len(values) > 1:
        raise BadRequest("more than one X-Agentproxy-Parent-Task header")
    try:
        return parse_declared_task(values[0] if values else None)
    except BadRequest:
        raise BadRequest(
            "X-Agentproxy-Parent-Task must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', "
            "':', '-'"
        ) from None
