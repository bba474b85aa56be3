"""The MCP (Streamable HTTP) shell: the HTTP exchange, plus what MCP needs on top of it.

After the caller is authenticated it reads the (bounded) JSON-RPC body and lets the MCP
adapter name every message in it, so policy sees `mcp:tools/call/payments.transfer` with its
arguments instead of `POST /mcp`. The body forwarded is the one authorized, byte for byte.
Refusals answer the JSON-RPC request (HTTP 200), since older SDK clients tear the session
down on a 4xx. A listing (`tools/list`, `prompts/list`, `resources/list`,
`resources/templates/list`) is filtered to the items this principal could ever be allowed to
use, and tool definitions are pinned.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import orjson

from agentproxy.clock import Clock
from agentproxy.config.model import Upstream
from agentproxy.core import Call, TraceContext
from agentproxy.errors import BadRequest, Denied, UpstreamFailed
from agentproxy.policy import could_allow
from agentproxy.protocols import mcp
from agentproxy.protocols.http import (
    header_key,
    parse_traceparent,
    response_headers_to_return,
)
from agentproxy.proxy.http import HttpExchange
from agentproxy.proxy.http_wire import Request, Response
from agentproxy.proxy.offload import parse_off_loop
from agentproxy.proxy.pins import McpState
from agentproxy.proxy.runtime import Runtime
from agentproxy.proxy.upstream import UpstreamAnswer, UpstreamClient

log = logging.getLogger("agentproxy.mcp")

# A listing is read whole to filter it; far larger than any real catalogue.
MAX_LISTING_BYTES = 16 * 1024 * 1024


def described(call: Call, parsed: mcp.McpRequest, upstream: Upstream) -> None:
    """The call as its JSON-RPC messages name it: the first message's action, and the rest
    of a batch, on this upstream. Shared with the ext_authz shell."""
    actions = [replace(action, upstream=upstream.name) for action in parsed.actions]
    call.action = actions[0]
    call.batch = tuple(actions[1:])


class McpExchange(HttpExchange):
    def __init__(
        self,
        request: Request,
        runtime: Runtime,
        upstream: Upstream,
        path: str,
        raw_query: str,
        upstream_client: UpstreamClient,
        clock: Clock,
        state: McpState,
    ) -> None:
        super().__init__(request, runtime, upstream, path, raw_query, upstream_client, clock)
        self.mcp_upstream = upstream
        self.state = state
        self.parsed: mcp.McpRequest | None = None

    async def describe(self, call: Call) -> None:
        """Reads the body (bounded by `max_body_bytes`) and names every message in it, off
        the loop when it is large or compressed.

        Raises BadRequest or PayloadTooLarge for a body that cannot be read unambiguously,
        LimitRefused when this agent already has too many large bodies being read.
        """
        request = self.request
        upstream = self.mcp_upstream
        # Every spelling a server may read as Mcp-Session-Id (CGI-style servers fold '_').
        sessions = [v for k, v in request.headers.items() if header_key(k) == "mcp-session-id"]
        if len(sessions) > 1:
            raise BadRequest("more than one Mcp-Session-Id header")
        call.session = sessions[0] if sessions else None
        principal = call.principal
        if (
            call.session is not None
            and principal is not None
            and self.state.sessions.is_another_principals(upstream.name, call.session, principal)
        ):
            # Its id and an event id would let this caller read the owner's answers.
            raise Denied("Mcp-Session-Id names a session another principal started")
        body = b""
        if request.method == "POST":
            body = await self._read_body(call, upstream.max_body_bytes)
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            lower = name.lower()
            if lower in headers and lower.startswith("mcp-"):
                # Servers may route on these: two copies could be read either way.
                raise BadRequest(f"more than one {name} header")
            headers[lower] = value
        read = functools.partial(
            mcp.describe, request.method, headers, body, max_bytes=upstream.max_body_bytes
        )
        agent = call.principal.agent if call.principal is not None else ""
        parsed = await parse_off_loop(agent, body, headers.get("content-encoding"), read)
        self.parsed = parsed
        described(call, parsed, upstream)
        if call.trace.parent_id is None and not parsed.batch and b'"traceparent"' in parsed.body:
            call.trace = meta_trace(parsed.body, call.trace)

    def _request_data(self, call: Call, upstream: Upstream) -> AsyncIterator[bytes] | bytes | None:
        # Exactly the JSON that was authorized, decoded (already counted in describe).
        if self.request.method != "POST" or self.parsed is None:
            return None
        return self.parsed.body

    def _upstream_headers(self, call: Call, upstream: Upstream) -> list[tuple[str, str]]:
        headers = [
            (k, v)
            for k, v in super()._upstream_headers(call, upstream)
            # the body goes out decoded, and aiohttp sets its length
            if k.lower() not in ("content-encoding", "content-length")
        ]
        if self.parsed is not None and mcp.listing_ids(self.parsed):
            # The listing is read and filtered here: ask for it uncompressed.
            headers = [(k, v) for k, v in headers if k.lower() != "accept-encoding"]
        return headers

    async def refuse(self, call: Call) -> None:
        refusal = call.refusal
        if refusal is None:
            raise ValueError("refuse() needs call.refusal")
        upstream = self.mcp_upstream
        challenge = self.runtime.challenge(upstream)
        reply = mcp.render(
            refusal,
            decision_id=call.id,
            request=self.parsed,
            tool_errors=upstream.tool_errors,
            refused_index=call.refused_at or 0,
            resource_metadata=challenge.metadata_url,
            scope=challenge.scopes,
            scope_challenge=upstream.scope_challenge,
        )
        response = Response(status=reply.status, body=reply.body)
        for name, value in reply.headers:
            response.headers.add(name, value)
        response.headers["Server"] = "agentproxy"
        call.status = reply.status
        self.response = response

    async def _stream_back(self, call: Call, upstream_response: UpstreamAnswer) -> None:
        issued = upstream_response.headers.get("Mcp-Session-Id")
        if (
            issued is not None
            and call.session is None  # a new session: an id the caller sent is never claimed
            and call.principal is not None
            and upstream_response.status < 300
        ):
            self.state.sessions.bind(self.mcp_upstream.name, issued, call.principal)
        ended = self.request.method == "DELETE" and upstream_response.status < 300
        if ended and call.session is not None:
            self.state.sessions.end(self.mcp_upstream.name, call.session)
        parsed = self.parsed
        listings = mcp.listing_ids(parsed) if parsed is not None else ()
        if not listings or upstream_response.status != 200:
            await super()._stream_back(call, upstream_response)
            return
        payload = await self._read_listing(upstream_response)
        content_type = upstream_response.headers.get("Content-Type", "")
        try:
            # Every listing of a batch is filtered (and tools pinned) as a single one would be.
            for request_id, method in listings:
                if method == "tools/list":
                    self._pin(mcp.listed_items(payload, content_type, request_id, method))
                keep = self._keep(call, method)
                payload = mcp.filter_listing(payload, content_type, request_id, method, keep)
        except ValueError as exc:
            # Never pass on a listing we could not read: it might list what is hidden.
            log.warning(
                "upstream %s sent a listing we cannot read: %s", self.mcp_upstream.name, exc
            )
            raise UpstreamFailed("the upstream's listing answer could not be read") from None
        response = Response(status=200, body=payload)
        for name, value in response_headers_to_return(upstream_response.headers.items()):
            if name.lower() not in ("content-length", "content-encoding", "transfer-encoding"):
                response.headers.add(name, value)
        call.status = 200
        call.bytes_out = len(payload)
        self.response = response

    async def _read_listing(self, upstream_response: UpstreamAnswer) -> bytes:
        if upstream_response.headers.get("Content-Encoding", "identity") != "identity":
            raise UpstreamFailed("the upstream compressed its listing answer")
        chunks: list[bytes] = []
        size = 0
        async for chunk in upstream_response.content.iter_any():
            size += len(chunk)
            if size > MAX_LISTING_BYTES:
                raise UpstreamFailed("the upstream's listing answer is too large to inspect")
            chunks.append(chunk)
        return b"".join(chunks)

    def _pin(self, tools: list[dict[str, Any]]) -> None:
        upstream = self.mcp_upstream
        if upstream.pin_tools == "off":
            return
        for tool in tools:
            name = tool.get("name")
            if not isinstance(name, str):
                continue
            seen = self.state.pins.observe(upstream.name, name, mcp.tool_fingerprint(tool))
            if seen == "changed" and self.state.on_tool_change is not None:
                self.state.on_tool_change(upstream.name, name)

    def _keep(self, call: Call, method: str) -> Callable[[dict[str, Any]], bool]:
        policy = self.runtime.policy
        principal = call.principal
        upstream = self.mcp_upstream
        pins = self.state.pins
        enforce_pins = method == "tools/list" and upstream.pin_tools == "enforce"

        def keep(item: dict[str, Any]) -> bool:
            action = mcp.listed_action(method, item)
            if action is None or principal is None:
                return False
            if enforce_pins and pins.is_changed(upstream.name, item["name"]):
                return False
            return could_allow(policy, action, principal, upstream.name)

        return keep


def meta_trace(body: bytes, trace: TraceContext) -> TraceContext:
    """The trace a request's `params._meta.traceparent` continues (MCP clients carry the
    W3C context there; OpenTelemetry's MCP conventions), keeping our span; `trace` when the
    message names none, or an invalid one. Read only without a `traceparent` header, which
    wins. The body is not rewritten: what is forwarded is what was authorized, so the
    upstream finds our span in the `traceparent` header, and the caller's `_meta` as sent."""
    message = orjson.loads(body)  # already read strictly by the adapter: same document
    params = message.get("params") if isinstance(message, dict) else None
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("traceparent"), str):
        return trace
    state = meta.get("tracestate")
    adopted = parse_traceparent(
        meta["traceparent"],
        state if isinstance(state, str) else None,
        trace.trace_id,
        trace.span_id,
    )
    return trace if adopted.parent_id is None else adopted
