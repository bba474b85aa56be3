"""One HTTP call's shell (`HttpExchange`): forwards an allowed call upstream, streaming both
ways without holding bodies in memory, or answers its refusal as problem+json. The MCP and
LLM exchanges extend it; `proxy/http_plane.py` picks one per request."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from agentproxy.clock import Clock
from agentproxy.config.model import Upstream
from agentproxy.core import Call
from agentproxy.errors import (
    BodyTimeout,
    PayloadTooLarge,
    UpstreamFailed,
    UpstreamTimeout,
)
from agentproxy.protocols.http import (
    render,
    request_headers_to_forward,
    response_headers_to_return,
)
from agentproxy.proxy.context import context_headers
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


class HttpExchange:
    """One HTTP call's shell: forwards it upstream or answers its refusal."""

    def __init__(
        self,
        request: web.BaseRequest,
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
        self._response: web.StreamResponse | None = None
        self._responded = False
        self._body_too_large = False
        self._body_stalled = False

    @property
    def responded(self) -> bool:
        return self._responded

    @property
    def response(self) -> web.StreamResponse:
        """What the caller gets: the forwarded answer or the refusal, else a bare 500 (a path
        that set neither is a bug, and must not look like a success). Built only then: a
        placeholder per call would cost as much as the rest of the exchange's setup."""
        if self._response is None:
            self._response = web.Response(status=500)
        return self._response

    @response.setter
    def response(self, response: web.StreamResponse) -> None:
        self._response = response

    async def describe(self, call: Call) -> None:
        """Plain HTTP is fully described by its request line."""

    async def refuse(self, call: Call) -> None:
        refusal = call.refusal
        if refusal is None:
            raise ValueError("refuse() needs call.refusal")
        reply = render(refusal, decision_id=call.id)
        response = web.Response(status=reply.status, body=reply.body)
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
        if (
            request.version >= (1, 1)
            and request.headers.get("Expect", "").lower() == "100-continue"
        ):
            # RFC 9110 §10.1.1: the client waits for this before sending the body. Only now,
            # once the call is allowed, is it invited; a refused call never sends its body.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
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
            self._check_body_size(upstream)
            call.upstream_seconds = self.clock.monotonic() - sent
            raise UpstreamTimeout(
                f"upstream {upstream.name} did not answer within {upstream.timeout:g}s"
            ) from None
        except (aiohttp.ClientError, OSError, HttpProcessingError) as exc:
            self._check_body_size(upstream)
            call.upstream_seconds = self.clock.monotonic() - sent
            log.warning("upstream %s failed for call %s: %r", upstream.name, call.id, exc)
            raise UpstreamFailed(
                f"upstream {upstream.name} is unreachable or broke the connection"
            ) from None
        try:
            await self._stream_back(call, upstream_response)
        finally:
            upstream_response.release()
            call.upstream_seconds = self.clock.monotonic() - sent

    def _check_body_size(self, upstream: Upstream) -> None:
        if self._body_stalled:
            raise BodyTimeout(
                f"the request body stopped arriving for "
                f"{self.runtime.config.listen.body_timeout:g}s (listen.body_timeout)"
            )
        if self._body_too_large:
            raise PayloadTooLarge(
                f"request body exceeds the limit of {upstream.max_body_bytes} bytes"
            )

    def _upstream_headers(self, call: Call, upstream: Upstream) -> list[tuple[str, str]]:
        creds = upstream.credentials
        strip = _stripped(creds.header if creds is not None else None)
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
        if creds is not None:
            headers.append((creds.header, creds.prefix + creds.value.value.decode("latin-1")))
        return headers

    async def _read_body(self, call: Call, limit: int) -> bytes:
        """The whole body, for adapters that must read it to name the action (MCP, LLM).

        Raises PayloadTooLarge past `limit` bytes (checked on Content-Length first).
        """
        length = self.request.content_length
        # Says which setting to change: MCP and LLM upstreams have small defaults.
        where = f" (max_body_bytes of upstream {self.upstream.name})" if self.upstream else ""
        if length is not None and length > limit:
            raise PayloadTooLarge(f"request body is {length} bytes; the limit is {limit}{where}")
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
            except TimeoutError:
                self._body_stalled = True
                raise BodyTimeout(
                    f"the request body stopped arriving for {wait:g}s (listen.body_timeout)"
                ) from None
            if not chunk:
                return
            yield chunk

    def _request_data(self, call: Call, upstream: Upstream) -> AsyncIterator[bytes] | bytes | None:
        """What is sent upstream as the body: the caller's, streamed."""
        if not self.request.body_exists:
            return None
        return self._body(call, upstream.max_body_bytes)

    async def _body(self, call: Call, limit: int) -> AsyncIterator[bytes]:
        async for chunk in self._chunks():
            call.bytes_in += len(chunk)
            if call.bytes_in > limit:
                # Aborting the upload cuts the upstream request short: it never sees a
                # complete body, and the caller gets a 413.
                self._body_too_large = True
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            yield chunk

    async def _stream_back(self, call: Call, upstream_response: UpstreamAnswer) -> None:
        content = upstream_response.content
        # Most small answers arrive whole with their headers. Those go back in one write,
        # headers and body together, instead of two (a system call and a packet fewer per
        # call: web.Response coalesces, StreamResponse sends its headers at once, which an
        # answer still streaming needs).
        whole = content.is_eof()
        response = (web.Response if whole else web.StreamResponse)(
            status=upstream_response.status,
            reason=upstream_response.reason,
            # Copied into a CIMultiDict in C instead of an add() per header; duplicates and
            # order are kept.
            headers=response_headers_to_return(upstream_response.headers.items()),
        )
        self._adjust_response_headers(upstream_response, response)
        call.status = upstream_response.status
        self.response = response
        self._responded = True
        try:
            if isinstance(response, web.Response):
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

    # Hooks for exchanges that read the answer as it passes (LLM usage); plain HTTP passes
    # every byte through as it arrives.
    def _adjust_response_headers(
        self, upstream_response: UpstreamAnswer, response: web.StreamResponse
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
