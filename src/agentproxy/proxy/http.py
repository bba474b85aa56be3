"""One HTTP call's shell (`HttpExchange`): forwards an allowed call upstream, streaming both
ways without holding bodies in memory, or answers its refusal as problem+json. The MCP and
LLM exchanges extend it; `proxy/http_plane.py` picks one per request."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

import aiohttp
import orjson

from agentproxy.clock import Clock
from agentproxy.config.model import Upstream
from agentproxy.core import Action, Call, Facts
from agentproxy.errors import (
    BadRequest,
    BodyTimeout,
    PayloadTooLarge,
    Refusal,
    UnshapedAnswer,
    UnsupportedMediaType,
    UpstreamFailed,
    UpstreamTimeout,
)
from agentproxy.policy.bodies import AnswerShape, answer_shape, body_reader
from agentproxy.policy.shaping import ShapeError
from agentproxy.protocols.body import decode_content
from agentproxy.protocols.http import (
    header_key,
    render,
    request_headers_to_forward,
    response_headers_to_return,
)
from agentproxy.protocols.http_body import (
    FORM_MEDIA,
    BodyKind,
    HttpBody,
    body_kind,
    check_method_override,
    check_query_overlap,
    form_names,
    is_json_media,
    parse_body,
)
from agentproxy.protocols.openapi import BodyValidator
from agentproxy.protocols.strict_json import JsonError, parse_answer
from agentproxy.proxy.context import context_headers, credential_header, upstream_credential
from agentproxy.proxy.http_wire import Request, Response, StreamResponse
from agentproxy.proxy.offload import parse_off_loop, shape_off_loop
from agentproxy.proxy.runtime import Runtime
from agentproxy.proxy.upstream import HttpProcessingError, UpstreamAnswer, UpstreamClient, origin_of

log = logging.getLogger("agentproxy.http")

CHUNK = 64 * 1024
# Set by the proxy (context) or by the exchange itself; an inbound copy never passes.
_ALWAYS_STRIPPED = frozenset({"traceparent", "tracestate", "expect"})


@functools.lru_cache(maxsize=64)
def _stripped(credential_header: str | None) -> frozenset[str]:
    """Request headers never forwarded as sent: ours to set, and the upstream's credential
    header, so that an agent cannot supply its own."""
    if credential_header is None:
        return _ALWAYS_STRIPPED
    return _ALWAYS_STRIPPED | {credential_header.lower()}


def why_read_body(runtime: Runtime, upstream: Upstream, action: Action) -> str | None:
    """What needs a plain HTTP call's body read as `args` (for the refusal of one that cannot
    be), or None to stream it unread."""
    if upstream.body == "stream":
        return None
    operation = runtime.operation(action) if upstream.openapi else None
    if operation is not None and operation[0].validator is not None:
        return f"operation {operation[0].spec.id} of upstream {upstream.name} has a body schema"
    if upstream.body != "auto":
        return f"upstream {upstream.name} reads every body as {upstream.body}"
    rule = body_reader(runtime.policy, action)
    if rule is not None:
        return f"rule {rule} reads the request body"
    if runtime.audit_reads_args:
        return AUDIT_ONLY
    return None


# Only the audit's redaction wants the body: one that is neither JSON nor a form has no args to
# redact, and streams unread as it would without the audit (no rule decides on it).
AUDIT_ONLY = "audit.redact names args"


class HttpExchange:
    """One HTTP call's shell: forwards it upstream or answers its refusal."""

    def __init__(
        self,
        request: Request,
        runtime: Runtime,
        upstream: Upstream | None,
        path: str,
        raw_query: str,
        upstream_client: UpstreamClient,
        clock: Clock,
    ) -> None:
        self.request = request
        self.runtime = runtime
        self.clock = clock
        self.upstream = upstream
        self.raw_query = raw_query
        # The normalized path the HTTP adapter described: what is forwarded, whatever action
        # a protocol adapter later names (an MCP tool) for policy.
        self.path = path
        self.upstream_client = upstream_client
        self._response: StreamResponse | None = None
        self._responded = False
        # Why the caller's body stopped (too large, stalled, the caller gone): the refusal
        # the call gets when the upstream request fails with it.
        self._body_failed: Refusal | None = None
        self._continued = False
        # A body read as `args` (forwarded as these bytes), and the answer's obligations.
        self.parsed_body: HttpBody | None = None
        self._shape: AnswerShape | None = None
        # The CORS headers of the answer (`cors:` on the upstream), set by the data plane.
        self.cors_headers: tuple[tuple[str, str], ...] = ()
        self._cors_applied = False

    def apply_cors(self, response: StreamResponse) -> None:
        """Puts `cors_headers` on the answer before it is sent, once, in place of any the
        upstream set: with `cors:` the proxy alone says which origins may read it."""
        if not self.cors_headers or self._cors_applied or response.prepared:
            return
        self._cors_applied = True
        for name in {n for n in response.headers if n.lower().startswith("access-control-")}:
            response.headers.popall(name, None)
        for name, value in self.cors_headers:
            response.headers.add(name, value)

    @property
    def responded(self) -> bool:
        return self._responded

    @property
    def response(self) -> StreamResponse:
        """What the caller gets: the forwarded answer or the refusal, else a bare 500 (a path
        that set neither is a bug, and must not look like a success). Built only then: a
        placeholder per call would cost as much as the rest of the exchange's setup."""
        if self._response is None:
            self._response = Response(status=500)
        return self._response

    @response.setter
    def response(self, response: StreamResponse) -> None:
        self._response = response

    async def describe(self, call: Call) -> None:
        """Reads the body as `args` when something needs it (`why_read_body`); otherwise plain
        HTTP is described by its request line and its body streams unread.

        Raises UnsupportedMediaType for a body that must be read but is neither JSON nor a
        form, BadRequest or PayloadTooLarge for one that cannot be read unambiguously,
        LimitRefused when this agent already has too many large bodies being read; BadRequest
        too when the query names a field of the body (`check_query_overlap`).
        """
        upstream = self.upstream
        if upstream is None:
            return
        action = call.action
        if action.operation == "POST" and action.query:
            check_method_override("POST", None, action.query)
        if upstream.body == "stream":
            return
        body_exists = self.request.body_exists
        if not body_exists and not upstream.openapi:
            return  # the common call: nothing to read

        async def read() -> bytes:
            return await self._read_body(call, upstream.max_body_bytes)

        parsed = await read_described_body(
            self.runtime,
            upstream,
            call.action,
            body_exists=body_exists,
            header=self._single_header,
            read=read,
            agent=call.principal.agent if call.principal is not None else "",
        )
        if parsed is None:
            return
        self.parsed_body = parsed
        call.action = replace(call.action, args=parsed.args)

    def _single_header(self, name: str) -> str | None:
        """The one value of a header the body is read by. Raises BadRequest for two (or a
        spelling, `Content_Type`, that some servers read as the same header)."""
        key = header_key(name)
        values = [v for k, v in self.request.headers.items() if header_key(k) == key]
        if len(values) > 1:
            raise BadRequest(f"more than one {name} header")
        return values[0] if values else None

    async def refuse(self, call: Call) -> None:
        refusal = call.refusal
        if refusal is None:
            raise ValueError("refuse() needs call.refusal")
        challenge = self.runtime.challenge(self.upstream)
        reply = render(
            refusal,
            decision_id=call.id,
            resource_metadata=challenge.metadata_url,
            scope=challenge.scopes,
        )
        response = Response(status=reply.status, body=reply.body)
        for name, value in reply.headers:
            response.headers.add(name, value)
        response.headers["Server"] = "agentproxy"
        if self.request.body_exists:
            # The body was not read; close rather than make the client wait while it drains.
            response.force_close()
        call.status = reply.status
        self.response = response

    async def forward(self, call: Call) -> None:
        """Streams the request upstream and the answer back.

        Raises PayloadTooLarge, UpstreamFailed or UpstreamTimeout before anything was sent to
        the caller; after that, failures close the connection so that a cut-off answer never
        looks complete.
        """
        upstream = self.upstream
        if upstream is None:
            raise UpstreamFailed("no upstream chosen")
        request = self.request
        length = request.content_length
        if length is not None and length > upstream.max_body_bytes:
            raise PayloadTooLarge(
                f"request body is {length} bytes; the limit is {upstream.max_body_bytes}"
            )
        await self._continue()
        policy = self.runtime.policy
        if policy.shapes and call.principal is not None:
            self._shape = answer_shape(
                policy, call.action, call.principal, call.facts or _NO_FACTS, call.now
            )
        headers = self._upstream_headers(call, upstream)
        data = self._request_data(call, upstream)
        if data is not None and not isinstance(data, bytes):
            # The first BUFFERED_BODY bytes (a small body: all of it) arrive before the
            # upstream is involved: a body trickled a byte at a time holds a coroutine here,
            # never one of the upstream's workers.
            data = await _read_ahead(data, BUFFERED_BODY)
        origin, base = origin_of(upstream.url)
        # Already normalized by the adapter: sent as it is.
        target = base + self.path + ("?" + self.raw_query if self.raw_query else "")
        sent = self.clock.monotonic()
        try:
            upstream_response = await self.upstream_client.request(
                origin,
                request.method,
                target,
                headers,
                data,
                upstream.timeout,
            )
        except TimeoutError:
            self._raise_body_failure()
            call.upstream_seconds = self.clock.monotonic() - sent
            raise UpstreamTimeout(
                f"upstream {upstream.name} did not answer within {upstream.timeout:g}s"
            ) from None
        except (aiohttp.ClientError, OSError, HttpProcessingError) as exc:
            self._raise_body_failure()
            call.upstream_seconds = self.clock.monotonic() - sent
            log.warning("upstream %s failed for call %s: %r", upstream.name, call.id, exc)
            raise UpstreamFailed(
                f"upstream {upstream.name} is unreachable or broke the connection"
            ) from None
        # A caller that goes away mid-answer closes the upstream request at once, not at the
        # next write (an SSE stream may be silent for minutes): the MCP server must see the
        # stream end for a `GET` with `Last-Event-ID` to get the live tail.
        forget = request.when_lost(upstream_response.abandon)
        try:
            await self._stream_back(call, upstream_response)
        finally:
            forget()
            upstream_response.release()
            call.upstream_seconds = self.clock.monotonic() - sent

    def _raise_body_failure(self) -> None:
        """Raises the refusal the caller's body ended with, if it did: the upstream request
        failed because of it, not because of the upstream."""
        if self._body_failed is not None:
            raise self._body_failed

    def _upstream_headers(self, call: Call, upstream: Upstream) -> list[tuple[str, str]]:
        strip = _stripped(credential_header(upstream))
        headers = request_headers_to_forward(self.request.headers.items(), strip=strip)
        peer = self.request.remote
        if peer:
            headers.append(("X-Forwarded-For", peer))
        headers.append(("X-Forwarded-Proto", self.request.scheme))
        if upstream.forwarded_host is not None:
            # From configuration, never the agent's Host: upstreams build links, redirects
            # and password-reset URLs from it.
            headers.append(("X-Forwarded-Host", upstream.forwarded_host))
        forwarded_path = origin_of(upstream.url)[1] + self.path
        headers.extend(
            context_headers(
                call, self.runtime.signer, method=self.request.method, path=forwarded_path
            )
        )
        credential = upstream_credential(call, upstream)
        if credential is not None:
            headers.append(credential)
        dropped: set[str] = set()
        parsed = self.parsed_body
        if parsed is not None:
            # The body goes out as the bytes parsed (decoded), and aiohttp sets its length.
            dropped |= {"content-length", "transfer-encoding"}
            if parsed.decoded:
                dropped.add("content-encoding")
        if self._shape is not None:
            # The answer is read whole to be shaped: uncompressed, and whole (a range of it
            # is not JSON, and a conditional 304 has nothing to shape but is not refused).
            dropped |= {"accept-encoding", "range", "if-range"}
        if dropped:
            headers = [(k, v) for k, v in headers if header_key(k) not in dropped]
        return headers

    async def _continue(self) -> None:
        """RFC 9110 §10.1.1: a client sending Expect: 100-continue waits for this before it
        sends the body. Sent once the call is authenticated and its body must be read, or once
        it is allowed: a caller without a valid token never sends its body."""
        request = self.request
        if self._continued:
            return
        self._continued = True
        if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == (
            "100-continue"
        ):
            request.send_continue()

    async def _read_body(self, call: Call, limit: int) -> bytes:
        """The whole body, for adapters that must read it to name the action (MCP, LLM).

        Raises PayloadTooLarge past `limit` bytes (checked on Content-Length first).
        """
        length = self.request.content_length
        # Says which setting to change: MCP and LLM upstreams have small defaults.
        where = f" (max_body_bytes of upstream {self.upstream.name})" if self.upstream else ""
        if length is not None and length > limit:
            raise PayloadTooLarge(f"request body is {length} bytes; the limit is {limit}{where}")
        await self._continue()
        chunks: list[bytes] = []
        async for chunk in self._chunks():
            call.bytes_in += len(chunk)
            if call.bytes_in > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes{where}")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _chunks(self) -> AsyncIterator[bytes]:
        """The agent's body as it arrives. Raises BodyTimeout when it stalls for longer than
        `listen.body_timeout` (a body trickled a byte at a time must not hold the proxy)."""
        content = self.request.content
        wait = self.runtime.config.listen.body_timeout
        while True:
            try:
                async with asyncio.timeout(wait):
                    chunk = await content.read(CHUNK)
            except Refusal as exc:
                # The caller left mid-body, or its body broke its framing: the upstream's
                # request fails with it, and the call is refused for what the caller did.
                self._body_failed = exc
                raise
            except TimeoutError:
                stalled = self._body_failed = BodyTimeout(
                    f"the request body stopped arriving for {wait:g}s (listen.body_timeout)"
                )
                raise stalled from None
            if not chunk:
                return
            yield chunk

    def _request_data(self, call: Call, upstream: Upstream) -> AsyncIterator[bytes] | bytes | None:
        """What is sent upstream as the body: the one read as `args`, else the caller's,
        streamed."""
        if self.parsed_body is not None:
            return self.parsed_body.body
        if not self.request.body_exists:
            return None
        return self._body(call, upstream.max_body_bytes)

    async def _body(self, call: Call, limit: int) -> AsyncIterator[bytes]:
        async for chunk in self._chunks():
            call.bytes_in += len(chunk)
            if call.bytes_in > limit:
                # Aborting the upload cuts the upstream request short: it never sees a
                # complete body, and the caller gets a 413.
                too_large = self._body_failed = PayloadTooLarge(
                    f"request body exceeds the limit of {limit} bytes"
                )
                raise too_large
            yield chunk

    async def _stream_back(self, call: Call, upstream_response: UpstreamAnswer) -> None:
        if self._shape is not None:
            await self._shaped_back(call, upstream_response, self._shape)
            return
        content = upstream_response.content
        # Most small answers arrive whole with their headers. Those go back in one write,
        # headers and body together, instead of two (a system call and a packet fewer per
        # call: Response coalesces, StreamResponse sends its headers at once, which an
        # answer still streaming needs).
        whole = content.is_eof()
        response = (Response if whole else StreamResponse)(
            status=upstream_response.status,
            reason=upstream_response.reason,
            # Copied into a CIMultiDict in C instead of an add() per header; duplicates and
            # order are kept.
            headers=response_headers_to_return(upstream_response.headers.items()),
        )
        self._adjust_response_headers(upstream_response, response)
        _budget_header(call, response)
        self.apply_cors(response)
        call.status = upstream_response.status
        self.response = response
        self._responded = True
        try:
            if isinstance(response, Response):
                body = self._tap(await content.read()) + self._tap_end(call)
                call.bytes_out += len(body)
                response.body = body
                await response.prepare(self.request)
                await response.write_eof()
                return
            await response.prepare(self.request)
            async for chunk in upstream_response.content.iter_any():
                out = self._tap(chunk)
                if out:
                    call.bytes_out += len(out)
                    await response.write(out)
            rest = self._tap_end(call)
            if rest:
                call.bytes_out += len(rest)
                await response.write(rest)
            await response.write_eof()
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            # Either side hung up mid-answer (a client that went away is routine, not a bug).
            call.error = f"stream cut short: {type(exc).__name__}"
            self._abort()

    async def _shaped_back(
        self, call: Call, upstream_response: UpstreamAnswer, shape: AnswerShape
    ) -> None:
        """The answer, read whole (up to the upstream's `max_response_bytes`) and shaped by
        the obligations of the rules that let the call through. Raises UnshapedAnswer for
        one that cannot be shaped (not JSON, too large, another shape than a path says):
        nothing is sent then, and the caller gets a 502."""
        upstream = self.upstream
        limit = upstream.max_response_bytes if upstream is not None else 0
        status = upstream_response.status
        raw = await self._read_answer(upstream_response, limit)
        headers = upstream_response.headers
        if status == 206:
            raise UnshapedAnswer("a partial answer (206) cannot be shaped")
        body = b""
        if raw.strip() and self.request.method != "HEAD":
            if not is_json_media(headers.get("Content-Type")):
                raise UnshapedAnswer(
                    f"rule {shape.rules[0]} shapes this answer, but it is not JSON"
                )
            agent = call.principal.agent if call.principal is not None else ""
            encoding = headers.get("Content-Encoding")
            # Inflated on the worker with the parse: 160 KiB of gzip is 16 MiB to inflate.
            work = functools.partial(_shape_answer, raw, encoding, limit, shape)
            compressed = encoding is not None and encoding.strip().lower() != "identity"
            body, shaped = await shape_off_loop(agent, raw, compressed, work)
            call.shaped = (shape.rules, shaped.fields, shaped.items)
        response = Response(status=status, reason=upstream_response.reason, body=body)
        for name, value in response_headers_to_return(headers.items()):
            if header_key(name) not in _RESHAPED_HEADERS:
                response.headers.add(name, value)
        self._adjust_response_headers(upstream_response, response)
        _budget_header(call, response)
        call.status = status
        call.bytes_out = len(body)
        self.response = response
        self._responded = True

    async def _read_answer(self, upstream_response: UpstreamAnswer, limit: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        name = self.upstream.name if self.upstream is not None else "-"
        async for chunk in upstream_response.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise UnshapedAnswer(
                    f"the answer is larger than {limit} bytes, the most this proxy shapes "
                    f"(max_response_bytes of upstream {name})"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    # Hooks for exchanges that read the answer as it passes (LLM usage); plain HTTP passes
    # every byte through as it arrives.
    def _adjust_response_headers(
        self, upstream_response: UpstreamAnswer, response: StreamResponse
    ) -> None:
        return None

    def _tap(self, chunk: bytes) -> bytes:
        return chunk

    def _tap_end(self, call: Call) -> bytes:
        return b""

    def _abort(self) -> None:
        # Closing without the final chunk (or short of Content-Length) tells the caller the
        # answer is incomplete; finishing it normally would make a cut-off body look whole.
        transport = self.request.transport
        if transport is not None:
            transport.abort()


_NO_FACTS = Facts()
# Headers that describe the upstream's bytes, not the shaped answer's.
_RESHAPED_HEADERS = frozenset(
    {
        "content-length",
        "content-encoding",
        "etag",
        "content-md5",
        "digest",
        "content-range",
        "accept-ranges",
        "transfer-encoding",
    }
)


_FORM = FORM_MEDIA
BUDGET_HEADER = "X-Agentproxy-Budget-Remaining"


def _budget_header(call: Call, response: StreamResponse) -> None:
    """What the spend limits the call took from have left (`llm-budget=0.0449 USD`), set by
    the proxy only (the upstream's own copy never passes)."""
    response.headers.popall(BUDGET_HEADER, None)
    if call.budgets:
        response.headers[BUDGET_HEADER] = ", ".join(
            f"{name}={remaining:.6g} {currency}".rstrip()
            for name, remaining, currency in call.budgets
        )


def _read_checked(
    kind: BodyKind,
    encoding: str | None,
    body: bytes,
    max_bytes: int,
    validator: BodyValidator | None,
    spellings: Mapping[str, frozenset[str]] | None,
) -> HttpBody:
    """The body parsed and, for an OpenAPI operation with a schema, validated (both on the
    worker when it is large: validating costs more than parsing). Raises BadRequest,
    PayloadTooLarge."""
    parsed = parse_body(kind, encoding, body, max_bytes=max_bytes, spellings=spellings)
    if validator is not None:
        validator.check(parsed.args)
    return parsed


def _shape_answer(
    raw: bytes, encoding: str | None, limit: int, shape: AnswerShape
) -> tuple[bytes, Any]:
    """The answer decoded, parsed, shaped and serialized again (on the worker when it is
    large or compressed). Raises UnshapedAnswer."""
    try:
        raw = decode_content(encoding, raw, limit)
    except Refusal:
        raise UnshapedAnswer("the answer's content coding cannot be read") from None
    try:
        document = parse_answer(raw)
    except JsonError as exc:
        # Named in the proxy's log only: the parser's message may quote the answer.
        log.warning("an answer to be shaped is not strict JSON: %s", exc)
        raise UnshapedAnswer(
            "the answer is not JSON that every parser reads alike (duplicate keys, NaN, "
            "numbers out of range, invalid UTF-8), so it cannot be shaped"
        ) from None
    try:
        shaped = shape.apply(document)
    except ShapeError as exc:
        raise UnshapedAnswer(f"the answer cannot be shaped: {exc}") from None
    try:
        return orjson.dumps(document), shaped
    except orjson.JSONEncodeError as exc:
        raise UnshapedAnswer(f"the shaped answer cannot be written: {exc}") from None


# A body's first bytes, up to this many, arrive before the upstream sees the request (a
# smaller body: all of it); the rest streams, the upstream's timeout running while it is sent.
BUFFERED_BODY = 64 * 1024


async def _read_ahead(body: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes] | bytes:
    """`body` whole if it ends within `limit` bytes, else its first `limit` bytes or more
    already read, followed by the rest as it comes. Raises what reading `body` raises."""
    head: list[bytes] = []
    size = 0
    async for chunk in body:
        head.append(chunk)
        size += len(chunk)
        if size >= limit:
            return _chain(b"".join(head), body)
    return b"".join(head)


async def _chain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk


async def read_described_body(
    runtime: Runtime,
    upstream: Upstream,
    action: Action,
    *,
    body_exists: bool,
    header: Callable[[str], str | None],
    read: Callable[[], Awaitable[bytes]],
    agent: str,
) -> HttpBody | None:
    """A plain HTTP body read as `args` when something needs it (`why_read_body`, an OpenAPI
    schema), else None: `HttpExchange.describe`'s, and ext_authz's (Envoy sends the body).
    `header(name)` gives the one value of a request header (asked only for a body that is
    read); `read` the body's bytes, bounded.

    Raises UnsupportedMediaType, BadRequest, PayloadTooLarge, LimitRefused as the data plane.
    """
    if upstream.body == "stream":
        return None
    found = runtime.operation(action) if upstream.openapi else None
    operation = found[0] if found is not None else None
    if not body_exists:
        if operation is not None and operation.spec.body_required:
            raise BadRequest(f"operation {operation.spec.id} requires a request body")
        return None
    why = why_read_body(runtime, upstream, action)
    content_type = header("Content-Type")
    if (
        why is None
        and action.operation == "POST"
        and upstream.body == "auto"
        and content_type is not None
        and _FORM in content_type.lower()
    ):
        # No rule reads it, so it is not held to the strict form reading: only looked
        # through for a `_method` field, and forwarded as read.
        raw = await read()
        if header("Content-Encoding") in (None, "identity"):
            check_method_override("POST", form_names(raw), {})
        return HttpBody(None, raw, "form", decoded=False)
    if why is None:
        return None
    encoding = header("Content-Encoding")
    try:
        kind = body_kind(upstream.body, content_type, why=why)
    except UnsupportedMediaType:
        if why is AUDIT_ONLY:
            return None
        raise
    validator = operation.validator if operation is not None else None
    if (
        operation is not None
        and validator is not None
        and kind != "json"
        and _FORM not in operation.spec.body_media
    ):
        media = ", ".join(operation.spec.body_media)
        raise UnsupportedMediaType(f"operation {operation.spec.id} takes {media}")
    body = await read()
    work = functools.partial(
        _read_checked,
        kind,
        encoding,
        body,
        upstream.max_body_bytes,
        validator if kind == "json" else None,
        runtime.policy.arg_spellings,
    )
    parsed = await parse_off_loop(agent, body, encoding, work)
    check_query_overlap(parsed.args, action.query)
    check_method_override(action.operation, parsed.args, action.query)
    return parsed
