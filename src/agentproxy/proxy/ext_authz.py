"""The decision service behind Envoy (and Istio): `envoy.service.auth.v3.Authorization/Check`.

A platform that already runs Envoy plugs agentproxy in as its external authorizer instead of
adding a second proxy. Each Check is one call through the same pipeline as the data plane's
(identify, describe, pins, decide, gate, limits, audit, record): the request line is routed
and described by the HTTP adapter; after the token verifies, the body Envoy sends
(`with_request_body`) is read as the data plane reads it (an MCP message names its tool, an
LLM request its model, a REST body is `args`); an allowed call answers OK with the headers
the data plane would add (the signed context, the upstream's credential) and the ones to
remove (the agent's token, anything it sent as ours); a refusal answers the data plane's own
status, headers and body (problem+json, a JSON-RPC error for MCP, the provider's error shape
for an LLM API), so an agent behind Envoy sees what it would see behind agentproxy.

What Envoy forwards is what it received, not what was decided on, so only a request the
proxy would forward unchanged is allowed: a path not in canonical form, or an LLM request
whose stream the proxy would have to ask for usage, is refused. ext_authz sees no answers:
`tools/list` filtering, tool pinning, answer shaping and LLM usage need the proxy inline.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import grpc

from agentproxy.config.model import Upstream
from agentproxy.core import Call
from agentproxy.errors import (
    BadRequest,
    CorsRefused,
    InternalError,
    NotFound,
    PayloadTooLarge,
    Refusal,
    Unauthenticated,
)
from agentproxy.protocols import cors, llm, mcp
from agentproxy.protocols.http import (
    HOP_BY_HOP,
    bearer_token,
    parse_declared_task,
    render,
    request_headers_to_forward,
)
from agentproxy.protocols.http_body import HttpBody
from agentproxy.proxy import llm as llm_shell
from agentproxy.proxy import mcp as mcp_shell
from agentproxy.proxy.context import context_headers, credential_header, upstream_credential
from agentproxy.proxy.http import read_described_body
from agentproxy.proxy.http_plane import UNPARSED, is_mcp_endpoint, origin_not_listed
from agentproxy.proxy.offload import parse_off_loop
from agentproxy.proxy.pipeline import Pipeline, start_call
from agentproxy.proxy.upstream import origin_of

log = logging.getLogger("agentproxy.ext_authz")

__all__ = ["Checked", "GatewayRequest", "decide_request"]


class GatewayRequest:
    """One request as a gateway describes it: method, path with query, lower-case headers
    (Envoy joins repeated ones with ","), and the body it buffered (None: none sent)."""

    __slots__ = ("body", "headers", "http_mode", "method", "path")

    def __init__(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes | None,
        *,
        http_mode: bool = False,
    ) -> None:
        """`http_mode`: asked by Envoy's HTTP ext_authz (headers it may set are only those
        its `allowed_upstream_headers` lists), not the gRPC Check (which overwrites)."""
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.http_mode = http_mode


class Checked:
    """The answer for a gateway: allowed with headers to set and remove, or the reply the
    data plane would have sent (status, headers, body)."""

    __slots__ = ("body", "call", "headers", "remove", "status")

    def __init__(self, call: Call) -> None:
        self.call = call
        self.status = 200
        self.headers: list[tuple[str, str]] = []
        self.remove: list[str] = []
        self.body = b""

    @property
    def allowed(self) -> bool:
        return self.call.refusal is None and self.call.forwarded


class ExtAuthzExchange:
    """The pipeline's shell for one Check: the body is Envoy's, "forward" computes the
    headers Envoy adds, "refuse" renders the data plane's reply."""

    def __init__(
        self, pipeline: Pipeline, request: GatewayRequest, upstream: Upstream | None, path: str
    ) -> None:
        self.pipeline = pipeline
        self.request = request
        self.upstream = upstream
        self.path = path
        self.answer: Checked | None = None
        self._mcp: mcp.McpRequest | None = None
        self._llm: llm.LlmRequest | None = None
        self._responded = False

    @property
    def responded(self) -> bool:
        return self._responded

    async def describe(self, call: Call) -> None:
        """Reads the body as the data plane would (after identify: no body is parsed for a
        caller without a valid token). Raises the data plane's refusals for it."""
        upstream, request = self.upstream, self.request
        if upstream is None:
            return
        body = request.body or b""
        if len(body) > upstream.max_body_bytes:
            raise PayloadTooLarge(
                f"request body is {len(body)} bytes; the limit is {upstream.max_body_bytes}"
            )
        call.bytes_in = len(body)
        agent = call.principal.agent if call.principal is not None else ""
        encoding = request.headers.get("content-encoding")
        if upstream.protocol == "llm":
            read_llm = functools.partial(
                llm.describe,
                request.method,
                self.path,
                request.headers,
                body,
                max_bytes=upstream.max_body_bytes,
            )
            parsed_llm = await parse_off_loop(agent, body, encoding, read_llm)
            if parsed_llm.strip_usage:
                # The proxy would ask the provider for the stream's usage by rewriting the
                # body; Envoy forwards it as sent, so it would go unmetered.
                raise BadRequest(
                    "behind a gateway, a streamed request must ask for usage itself: "
                    'send "stream_options": {"include_usage": true}'
                )
            self._llm = parsed_llm
            llm_shell.described(call, parsed_llm, upstream)
            return
        if is_mcp_endpoint(upstream, self.path):
            call.session = request.headers.get("mcp-session-id")
            read_mcp = functools.partial(
                mcp.describe,
                request.method,
                request.headers,
                body,
                max_bytes=upstream.max_body_bytes,
            )
            parsed = await parse_off_loop(agent, body, encoding, read_mcp)
            self._mcp = parsed
            mcp_shell.described(call, parsed, upstream)
            return

        async def read() -> bytes:
            return body

        described: HttpBody | None = await read_described_body(
            self.pipeline.runtime,
            upstream,
            call.action,
            body_exists=request.body is not None and len(body) > 0,
            header=lambda name: request.headers.get(name.lower()),
            read=read,
            agent=agent,
        )
        if described is not None:
            call.action = replace(call.action, args=described.args)

    async def forward(self, call: Call) -> None:
        """Allowed: the headers the data plane would send upstream, and those it strips."""
        upstream = self.upstream
        if upstream is None:
            raise BadRequest("no upstream serves this path")
        answer = Checked(call)
        forwarded = origin_of(upstream.url)[1] + self.path
        answer.headers = context_headers(
            call, self.pipeline.runtime.signer, method=self.request.method, path=forwarded
        )
        credential = upstream_credential(call, upstream)
        if credential is not None:
            answer.headers.append(credential)
        header = credential_header(upstream)
        # What the data plane would not forward: the agent's token and credential header,
        # ours as it sent them, method-override and client-address headers. Envoy's own
        # (pseudo-headers, Host, X-Forwarded-*, X-Request-Id, X-Envoy-*) are its to manage.
        strip = frozenset(
            {"traceparent", "tracestate"} | ({header.lower()} if header is not None else set())
        )
        kept = {
            name.lower()
            for name, _ in request_headers_to_forward(self.request.headers.items(), strip=strip)
        }
        # Envoy removes after it sets: a header we set is overwritten, never removed.
        ours = {name.lower() for name, _ in answer.headers}
        answer.remove = sorted(
            name
            for name in self.request.headers
            if name not in kept
            and name not in ours
            and not name.startswith(":")
            and name not in HOP_BY_HOP
            and not name.startswith(("x-forwarded-", "x-envoy-"))
            and name != "x-request-id"
        )
        call.status = 200
        self.answer = answer
        self._responded = True

    async def refuse(self, call: Call) -> None:
        refusal = call.refusal
        if refusal is None:
            raise ValueError("refuse() needs call.refusal")
        answer = Checked(call)
        upstream = self.upstream
        # The same challenge as the data plane's: Envoy passes it to the MCP client.
        challenge = self.pipeline.runtime.challenge(upstream)
        metadata, scope = challenge.metadata_url, challenge.scopes
        if self._mcp is not None and upstream is not None:
            reply = mcp.render(
                refusal,
                decision_id=call.id,
                request=self._mcp,
                tool_errors=upstream.tool_errors,
                refused_index=call.refused_at or 0,
                resource_metadata=metadata,
                scope=scope,
                scope_challenge=upstream.scope_challenge,
            )
        elif upstream is not None and upstream.protocol == "llm":
            reply = llm_shell.refusal_reply(refusal, call.id, self._llm, self.path)
        else:
            reply = render(refusal, decision_id=call.id, resource_metadata=metadata, scope=scope)
        answer.status = reply.status
        answer.headers = [(k, v) for k, v in reply.headers if k.lower() not in HOP_BY_HOP]
        answer.body = reply.body
        call.status = reply.status
        self.answer = answer
        self._responded = True


async def decide_request(pipeline: Pipeline, request: GatewayRequest) -> Checked:
    """The data plane's decision for a request a gateway holds. Never raises."""
    clock = pipeline.clock
    runtime = pipeline.runtime
    if request.method in ("GET", "HEAD") and runtime.metadata_documents:
        document = runtime.metadata_documents.get(request.path)
        if document is not None:
            return _metadata_answer(pipeline, document)
    headers = request.headers
    action, upstream, path, bearer, declared = UNPARSED, None, "", None, None
    refusal: Refusal | None = None
    try:
        action, raw_query, upstream = runtime.describe_http(request.method, request.path)
        path = action.target
        sent = request.path.partition("?")[0]
        if sent != path:
            # Envoy forwards the path as sent: what was decided must be what it sends.
            raise BadRequest(
                f"the path is not in canonical form ({path!r}); behind a gateway it is "
                "decided only as sent"
            )
        if is_mcp_endpoint(upstream, path) and raw_query:
            raise BadRequest("an MCP request carries no query string")
        credential = credential_header(upstream)
        if request.http_mode and credential is not None and credential.lower() in headers:
            # Envoy's HTTP mode sets the credential only if its allowed_upstream_headers names
            # it; if not, the agent's own value would reach the upstream. The agent never has
            # a reason to send it: refused rather than trusted to Envoy's config.
            raise BadRequest(
                f"the request carries {credential}, the upstream's credential header, which "
                "only the proxy sets"
            )
        origin = headers.get("origin")
        listed = upstream.cors if upstream is not None else None
        if listed is not None and origin is not None and not cors.is_allowed(listed, origin):
            # As the data plane: a page of another origin (MCP: "validate Origin", DNS
            # rebinding) is refused, whatever token it got hold of.
            raise CorsRefused(origin_not_listed(upstream, origin))
        bearer = bearer_token(headers.get("authorization"))
        if "," in (headers.get("authorization") or ""):
            raise Unauthenticated("more than one Authorization header")
        declared = parse_declared_task(headers.get("x-agentproxy-task"))
    except Refusal as exc:
        refusal = exc
    call = start_call(
        action,
        upstream.name if upstream is not None else "-",
        started=clock.monotonic(),
        now=clock.now(),
        bearer=bearer,
        declared_task=declared,
        refusal=refusal,
        traceparent=headers.get("traceparent"),
        tracestate=headers.get("tracestate"),
    )
    exchange = ExtAuthzExchange(pipeline, request, upstream, path)
    await pipeline.run(call, exchange)
    if exchange.answer is None:  # a path that neither refused nor forwarded: a bug
        log.error("ext_authz call %s ended with no answer", call.id)
        call.refusal = InternalError("internal error; the call was not decided")
        await exchange.refuse(call)
    answer = exchange.answer
    assert answer is not None
    return answer


def _metadata_answer(pipeline: Pipeline, document: bytes) -> Checked:
    """A protected resource metadata document (RFC 9728), answered to the client by the
    gateway itself: Envoy sends a denied response's status and body as they are, so a 200
    with the document reaches MCP clients without a token and without the upstream, which
    does not serve it. Not a call: nothing is decided or recorded."""
    clock = pipeline.clock
    call = start_call(
        UNPARSED,
        "-",
        started=clock.monotonic(),
        now=clock.now(),
        bearer=None,
        declared_task=None,
        refusal=NotFound("protected resource metadata, answered by the proxy"),
    )
    answer = Checked(call)
    answer.headers = [
        ("content-type", "application/json"),
        ("cache-control", "public, max-age=300"),
        ("access-control-allow-origin", "*"),
    ]
    answer.body = document
    return answer


# Envoy's Check, by the name Envoy calls it (the messages are wire-compatible copies).
CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"
_OVERWRITE_IF_EXISTS_OR_ADD = 2
_GRPC_OK, _GRPC_PERMISSION_DENIED = 0, 7


def check_response(answer: Checked) -> Any:
    """The envoy.service.auth.v3.CheckResponse for an answer."""
    from agentproxy.v1 import ext_authz_pb2 as pb

    def options(headers: list[tuple[str, str]]) -> list[Any]:
        return [
            pb.HeaderValueOption(
                header=pb.HeaderValue(key=name, value=value),
                append_action=_OVERWRITE_IF_EXISTS_OR_ADD,
            )
            for name, value in headers
        ]

    if answer.allowed:
        return pb.CheckResponse(
            status=pb.RpcStatus(code=_GRPC_OK),
            ok_response=pb.OkHttpResponse(
                headers=options(answer.headers), headers_to_remove=answer.remove
            ),
        )
    return pb.CheckResponse(
        status=pb.RpcStatus(code=_GRPC_PERMISSION_DENIED),
        denied_response=pb.DeniedHttpResponse(
            status=pb.HttpStatus(code=answer.status),
            headers=options(answer.headers),
            body=answer.body.decode("utf-8", errors="replace"),
        ),
    )


def gateway_request(check: Any) -> GatewayRequest:
    """A GatewayRequest of an envoy CheckRequest: its headers from the map, or from the
    header list Envoy sends with `encode_raw_headers` (repeated ones joined by ","); its body
    from raw_body when Envoy packs it as bytes, else its string form."""
    http = check.attributes.request.http
    headers = {key.lower(): value for key, value in http.headers.items()}
    for header in http.header_map.headers:
        name = header.key.lower()
        value = header.raw_value.decode("latin-1") if header.raw_value else header.value
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    body: bytes | None = None
    if http.raw_body:
        body = bytes(http.raw_body)
    elif http.body:
        body = http.body.encode("utf-8")
    return GatewayRequest(http.method, http.path, headers, body)


class AuthorizationHandler:
    """envoy.service.auth.v3.Authorization on the ext_authz listener, as a generic handler;
    each Check is decided by the pipeline of the snapshot in force."""

    def __init__(self, current: Callable[[], Pipeline]) -> None:
        from agentproxy.v1 import ext_authz_pb2 as pb

        self._current = current
        self._method = grpc.unary_unary_rpc_method_handler(
            self._check,
            request_deserializer=pb.CheckRequest.FromString,
            response_serializer=pb.CheckResponse.SerializeToString,
        )

    def service(self, details: Any) -> Any:
        return self._method if details.method == CHECK_METHOD else None

    async def _check(self, request: Any, context: Any) -> Any:
        answer = await decide_request(self._current(), gateway_request(request))
        return check_response(answer)


def add_authorization_service(server: Any, current: Callable[[], Pipeline]) -> None:
    server.add_generic_rpc_handlers((AuthorizationHandler(current),))
