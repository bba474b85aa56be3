"""The data-plane HTTP/1.1 listener: its connections, parsed by llhttp (`httptools`), each
request handed to the data plane and its answer written back, and its bounds on clients, so
that no client can hold the proxy.

It replaced aiohttp's server on the data plane (the admin listener still runs on aiohttp):
a bare answer costs ~40 µs of CPU through it against ~59 through aiohttp's `web.Server`
(request and response objects, its writer, its timers); a call of the whole pipeline 0.93x
(policy only) to 0.98x (full) of what it cost (bench/results/listener.md). What it keeps of
aiohttp's behaviour, and the bounds aiohttp lacked:

- `max_connections`: a connection beyond the cap is answered `503` and closed at once, before
  any byte of it is read (counted as refused, reason `max_connections`);
- `header_timeout`: once a request head has begun, all of it must arrive within this, or the
  connection is closed (`header_timeout`);
- `idle_timeout`: a keep-alive connection waiting for its next request (or a new one that has
  sent nothing) is closed after this, and so is one whose client reads nothing of its answer
  for this long (a zero receive window);
- heads are bounded: a request line or header field over 16 KiB, more than 128 header fields
  or 64 KiB of head, and anything llhttp refuses (both Content-Length and Transfer-Encoding,
  two lengths, a bare LF, a space before a colon, an invalid chunk) get a problem+json `400`
  (`414`, `431`) and the connection is closed (`malformed_request`), as is a trailer over
  64 KiB and more than `MAX_PIPELINED` requests waiting on one connection;
- requests on one connection are answered in order (pipelining), one at a time; a body is
  buffered up to `http_wire.HIGH_WATER` before the connection stops reading;
- a connection closes after its last answer by a half-close (RFC 9112 §9.6): what the client
  still sends (the rest of a body a refusal did not read) is dropped unparsed until it closes
  too, or for `LINGER` seconds, so that it reads the answer rather than a reset;
- a client that goes away is told to whoever streams to it (`when_lost`), so that the
  upstream request it was reading is closed at once (MCP stream resumption needs the upstream
  to see it end); the handler itself is not cancelled (records are written on the way out);
- `agentproxy_connections{listener}` counts what is open.

The body's own bound (`listen.body_timeout`) is the shell's, where the body is read.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from agentproxy.clock import Clock
from agentproxy.errors import (
    BadRequest,
    ClientLeft,
    HeadTooLarge,
    InternalError,
    Refusal,
    TargetTooLong,
)
from agentproxy.metering.metrics import Metrics
from agentproxy.protocols.http import render
from agentproxy.proxy.http_wire import (
    EMPTY_BODY,
    Body,
    Request,
    Response,
    StreamResponse,
    serialize_head,
)

log = logging.getLogger("agentproxy.listener")

Handler = Callable[[Request], Awaitable[StreamResponse]]

# Request lines and header fields up to 16 KiB (tokens have their own, lower limit:
# `identity.max_token_bytes`); at most this many fields, and this much head in all.
MAX_FIELD = 16 * 1024
MAX_HEADERS = 128
MAX_HEAD = 64 * 1024
# After an answer sent before its request's body ended: how long the rest may take to
# arrive (read and dropped) before the connection closes.
LINGER = 2.0
# Requests parsed and waiting for their answer on one connection. llhttp parses a whole read
# (up to 256 KiB: ~14,000 bodiless requests) before the connection can stop reading; past
# this many the connection is refused rather than holding them all.
MAX_PIPELINED = 64
# How often deadlines (head, idle, linger) are checked: one timer for every connection.
SWEEP = 0.25

_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Connection: close\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 41\r\n"
    b"Retry-After: 1\r\n\r\n"
    b"too many open connections; try again soon"
)


class ConnectionBounds:
    """What one listener allows, and how many of its connections are open."""

    __slots__ = ("_gauge", "_refused", "header_timeout", "idle_timeout", "max_connections", "open")

    def __init__(
        self,
        listener: str,
        metrics: Metrics,
        *,
        max_connections: int,
        header_timeout: float,
        idle_timeout: float,
    ) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.open = 0
        self._gauge = metrics.connections.labels(listener)
        self._refused = metrics.connections_refused

    def admit(self) -> bool:
        if self.open >= self.max_connections:
            self._refused.labels("max_connections").inc()
            return False
        self.open += 1
        self._gauge.set(self.open)
        return True

    def release(self) -> None:
        self.open -= 1
        self._gauge.set(self.open)

    def refused(self, reason: str) -> None:
        self._refused.labels(reason).inc()


class HttpConnection(asyncio.Protocol):
    """One client connection: admitted under the cap, parsed, its requests answered in
    order."""

    def __init__(self, listener: HttpListener) -> None:
        self._listener = listener
        self.clock = listener.clock
        self._loop = listener.loop
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._admitted = False
        self._lost = False
        self._on_lost: list[Callable[[], None]] = []
        # The head being parsed.
        self._url: list[bytes] = []
        self._url_size = 0
        self._fields: list[tuple[str, str]] = []
        self._head_size = 0
        self._head_stream = 0
        self._in_head = False
        # Bytes of reads that carried no body while a body is arriving: chunk-size lines,
        # extensions and the trailer, whose fields llhttp buffers until they end.
        self._framing = 0
        self._body_fed = False
        self._reading: Request | None = None  # the request whose body is arriving
        self._queue: collections.deque[Request] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._closing = False  # no request after the one being answered
        self._refusal: Refusal | None = None  # sent once the queued requests are answered
        self._read_paused = False
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        # What the sweeper checks: when, and why, this connection is closed unless it acts.
        self.deadline = 0.0
        self.deadline_reason = ""
        self.sent = 0  # writes so far: whether an answer has begun

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._listener.bounds.admit():
            # Refused before anything is read: nothing is parsed, nothing is started.
            writable: Any = transport
            writable.write(_REFUSAL)
            transport.close()
            return
        self._admitted = True
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer = str(peer[0])
        self._listener.connections.add(self)
        self._wait("idle", self._listener.bounds.idle_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self._lost = True
        self._listener.bounds.release()
        self._listener.connections.discard(self)
        self._listener.maybe_idle()
        lost = ClientLeft("the client closed the connection before its request ended")
        if self._reading is not None:
            self._reading.content.fail(lost)
            self._reading = None
        for request in self._queue:  # left to `_serve`, which stops at the one it answers
            request.content.fail(lost)
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_exception(lost)
        callbacks, self._on_lost = self._on_lost, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("a callback for a lost connection failed")

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # closing (lingering, a refused head, an upgrade): nothing more is parsed
        if self._in_head:
            # Bytes of a head begun in an earlier read: llhttp buffers a field until it ends,
            # so a field that never ends is bounded here, not by its callback.
            self._head_stream += len(data)
        reading = self._reading
        self._body_fed = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # A request asking for another protocol (websocket, h2c) is answered as plain
            # HTTP/1.1; whatever follows it is not HTTP/1.1, so nothing more is read.
            self._closing = True
        except httptools.HttpParserError as exc:
            if isinstance(exc, httptools.HttpParserCallbackError):
                cause = exc.__context__
                self._malformed(cause if isinstance(cause, Refusal) else BadRequest(str(exc)))
            else:
                self._malformed(BadRequest(f"the request is not valid HTTP/1.1: {exc}"))
            return
        if self._in_head and self._head_stream > MAX_HEAD + MAX_FIELD:
            self._malformed(HeadTooLarge(f"the request head exceeds {MAX_HEAD} bytes"))
            return
        if reading is not None and reading is self._reading and not self._body_fed:
            # A trailer field that never ends grows (and is copied) inside httptools with
            # every read: it gets the head's bound.
            self._framing += len(data)
            if self._framing > MAX_HEAD + MAX_FIELD:
                self._malformed(
                    HeadTooLarge(f"the chunked body's trailer exceeds {MAX_HEAD} bytes")
                )
                return
        if self._queue and self._task is None:
            # Started only once the bytes read so far parsed: a head that llhttp refuses
            # after its last field (an invalid Transfer-Encoding) is never handled.
            self._task = self._loop.create_task(self._serve())

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_size = 0
        self._head_stream = 0
        self._url = []
        self._url_size = 0
        self._fields = []
        self._wait("header", self._listener.bounds.header_timeout)

    def on_url(self, url: bytes) -> None:
        self._url_size += len(url)
        self._head_size += len(url)
        if self._url_size > MAX_FIELD:
            raise TargetTooLong(f"the request target exceeds {MAX_FIELD} bytes")
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) > MAX_FIELD or len(value) > MAX_FIELD:
            raise HeadTooLarge(f"a header field exceeds {MAX_FIELD} bytes")
        if len(self._fields) >= MAX_HEADERS:
            raise HeadTooLarge(f"more than {MAX_HEADERS} header fields")
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD:
            raise HeadTooLarge(f"the request head exceeds {MAX_HEAD} bytes")
        self._fields.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        self._in_head = False
        self.deadline_reason = ""  # the head arrived in time
        if self._closing:
            return  # nothing after the request being answered last is answered
        parser = self._parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise BadRequest(f"HTTP/{version} is not served here: send HTTP/1.1")
        if len(self._queue) >= MAX_PIPELINED:
            raise BadRequest(
                f"more than {MAX_PIPELINED} requests pipelined; wait for answers to send more"
            )
        headers = CIMultiDictProxy(CIMultiDict(self._fields))
        # llhttp refused a length that is not one run of digits, two of them, and a
        # Transfer-Encoding that does not end with chunked.
        declared = headers.get("Content-Length")
        length = int(declared) if declared is not None else None
        body_exists = "Transfer-Encoding" in headers or bool(length)
        request = Request(
            self,
            parser.get_method().decode("ascii"),
            b"".join(self._url).decode("utf-8", "surrogateescape"),
            (1, 1) if version == "1.1" else (1, 0),
            headers,
            content=Body(self) if body_exists else EMPTY_BODY,
            content_length=length,
            body_exists=body_exists,
            keep_alive=parser.should_keep_alive(),
        )
        self._framing = 0
        self._reading = request if body_exists else None
        self._queue.append(request)
        if len(self._queue) > 1:
            # Pipelined requests wait here, parsed; more are not read until they are answered.
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        self._body_fed = True
        self._framing = 0
        request = self._reading
        if request is not None:
            request.content.feed(body)

    def on_message_complete(self) -> None:
        request = self._reading
        if request is not None:
            self._reading = None
            request.content.end()

    # The exchanges' side

    def when_lost(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Calls `callback` once the client's connection is lost (at once if it already is),
        and returns what cancels that. The handler is not cancelled (records are written on
        the way out), so an exchange streaming an answer learns of it here instead of at its
        next write, which may never come."""
        if self._lost:
            callback()
            return _nothing
        self._on_lost.append(callback)

        def forget() -> None:
            if callback in self._on_lost:
                self._on_lost.remove(callback)

        return forget

    def write(self, data: bytes) -> None:
        """Raises ConnectionResetError once the client has gone."""
        self._writable().write(data)

    def writelines(self, data: tuple[bytes, ...]) -> None:
        """One send for several buffers (writev). Raises ConnectionResetError."""
        self._writable().writelines(data)

    def _writable(self) -> asyncio.Transport:
        transport = self.transport
        if transport is None or self._lost or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        self.sent += 1
        return transport

    async def drain(self) -> None:
        if not self._write_paused:
            return
        if self._lost:
            raise ConnectionResetError("the client closed the connection")
        drained = self._drained = self._loop.create_future()
        idle = self._listener.bounds.idle_timeout
        try:
            # A client that stops reading (a zero window) would hold the answer's writer, its
            # upstream request and this connection for as long as it liked.
            async with asyncio.timeout(idle):
                await drained
        except TimeoutError:
            self.abort()
            raise ConnectionResetError(f"the client read nothing for {idle:g}s") from None
        finally:
            self._drained = None

    def pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None and not self._lost:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and self.transport is not None and not self._lost:
            self._read_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def busy(self) -> bool:
        """Answering, or a request begun: not to be closed as idle."""
        return self._task is not None or self._in_head or bool(self._queue)

    def close_idle(self) -> None:
        if not self.busy:
            self._close()

    def cancel(self) -> None:
        """Cuts whatever is left at the end of a shutdown's grace."""
        if self._task is not None:
            self._task.cancel()
        self.abort()

    # Serving

    async def _serve(self) -> None:
        """Answers the queued requests in order, then waits for the next (idle)."""
        try:
            while self._queue and not self._lost:
                request = self._queue[0]
                response = await self._answer(request)
                if self._lost:
                    return  # connection_lost has failed what was queued: nothing more is sent
                self._queue.popleft()
                if self._read_paused and self._reading is None and len(self._queue) <= 1:
                    self.resume_reading()
                if response is None:
                    self.abort()  # an answer cut short must not look complete
                    return
                if not request.content.is_eof():
                    # Answered before its body ended: the rest is dropped as it comes.
                    self._close_lingering()
                    return
                ended = not (
                    response.keep_alive and request.keep_alive and not self._listener.closing
                )
                if ended or (self._closing and not self._queue):
                    # Closing: asked for, an upgrade, or a malformed request after these
                    # (its refusal goes last, when the connection is still in step).
                    if not ended:
                        self._send_refusal()
                    self._close_lingering()
                    return
                if self._queue:
                    # The next pipelined answer may never suspend (a refusal): without this
                    # one read of tiny requests would hold the loop for all of them.
                    await asyncio.sleep(0)
        finally:
            self._task = None
            self._listener.maybe_idle()
        if not self._lost and not self._in_head:
            self._wait("idle", self._listener.bounds.idle_timeout)

    async def _answer(self, request: Request) -> StreamResponse | None:
        """Runs the handler and sends what it returns. None when nothing more may be sent on
        the connection (the client left, or an answer was cut short)."""
        sent = self.sent
        try:
            response = await self._listener.handler(request)
        except Exception:
            log.exception("the data plane failed on a request")
            if self.sent != sent:
                return None
            response = _internal_error()
        try:
            if not response.prepared:
                await response.prepare(request)
            if not response.eof_sent:
                await response.write_eof()
        except ConnectionError:
            return None
        except ValueError:
            # A header the answer cannot carry (CR or LF): sent as a 500 if nothing of it
            # went out.
            log.exception("an answer could not be written")
            if self.sent != sent:
                return None
            response = _internal_error()
            try:
                await response.prepare(request)
                await response.write_eof()
            except ConnectionError:
                return None
        return response

    def _close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    def _wait(self, reason: str, seconds: float) -> None:
        self.deadline = self._loop.time() + seconds
        self.deadline_reason = reason

    def _malformed(self, refusal: Refusal) -> None:
        """A request the listener cannot take: the requests parsed before it are answered,
        then its problem+json refusal, and the connection closes (what follows it cannot be
        framed). Counted as refused (`malformed_request`)."""
        self._listener.bounds.refused("malformed_request")
        self._in_head = False
        self._closing = True
        self._refusal = refusal
        self.deadline_reason = ""
        reading = self._reading
        if reading is not None:
            # The refused message itself (its head parsed, its body not valid).
            self._reading = None
            reading.content.fail(refusal)
            if (
                self._queue
                and self._queue[-1] is reading
                and (self._task is None or len(self._queue) > 1)
            ):
                self._queue.pop()  # never handled: its refusal goes last
            else:
                # Being handled: the exchange reading its body gets the refusal and answers
                # with it; a second answer to the one request would desynchronize the client.
                self._refusal = None
        if self._task is None and self._queue:
            self._task = self._loop.create_task(self._serve())
        elif self._task is None:
            self._send_refusal()

    def _send_refusal(self) -> None:
        refusal, self._refusal = self._refusal, None
        transport = self.transport
        if refusal is None or transport is None or transport.is_closing():
            return
        transport.write(refusal_bytes(refusal))
        self._close_lingering()

    def _close_lingering(self) -> None:
        """Closes after the answers sent (RFC 9112 §9.6): closing with bytes of the client
        unread sends a reset, and a reset destroys the answers it has not read yet (those
        pipelined before a refused request, the refusal itself). What it still sends is
        dropped unparsed until it closes too, or LINGER passes."""
        self._closing = True
        self._queue.clear()  # parsed after the last answer: never answered
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()  # TLS: no half-close
            return
        try:
            transport.write_eof()
        except OSError:  # the client is already gone (ENOTCONN after its reset)
            transport.abort()
            return
        self.resume_reading()
        self._wait("linger", LINGER)

    def expired(self, now: float) -> None:
        """Called by the sweeper once `deadline` has passed."""
        reason = self.deadline_reason
        if not reason or now < self.deadline:
            return
        self.deadline_reason = ""
        if reason == "header":
            if self._in_head:
                self._listener.bounds.refused("header_timeout")
                self._closing = True
                self.abort()
            return
        if reason == "idle" and self.busy:
            return
        self._close()


def refusal_bytes(refusal: Refusal) -> bytes:
    """A refusal the listener answers itself, as a whole HTTP/1.1 message that closes."""
    reply = render(refusal, decision_id="-")
    lines = [(name, value) for name, value in reply.headers]
    lines += [
        ("Content-Length", str(len(reply.body))),
        ("Connection", "close"),
        ("Server", "agentproxy"),
    ]
    return serialize_head((1, 1), reply.status, None, lines) + reply.body


def _internal_error() -> Response:
    reply = render(InternalError("the proxy failed on this call"), decision_id="-")
    response = Response(status=reply.status, body=reply.body, headers=reply.headers)
    response.force_close()
    return response


class HttpListener:
    """The data plane's listening socket and its connections."""

    def __init__(self, handler: Handler, bounds: ConnectionBounds, clock: Clock) -> None:
        self.handler = handler
        self.bounds = bounds
        self.clock = clock
        self.loop = asyncio.get_running_loop()
        self.connections: set[HttpConnection] = set()
        self.closing = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._idle: asyncio.Event | None = None
        self._sweep_every = min(SWEEP, max(0.05, bounds.header_timeout / 4))

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listens; returns the port bound. Raises OSError."""
        self._server = await self.loop.create_server(
            lambda: HttpConnection(self),
            host,
            port,
            reuse_port=reuse_port or None,
            backlog=1024,
        )
        self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)
        for sock in self._server.sockets:
            address = sock.getsockname()
            if isinstance(address, tuple):
                return int(address[1])
        return 0

    def _sweep(self) -> None:
        now = self.loop.time()
        for connection in [c for c in self.connections if c.deadline_reason]:
            if connection.deadline <= now:
                connection.expired(now)
        self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)

    def maybe_idle(self) -> None:
        if self._idle is not None and not any(c.busy for c in self.connections):
            self._idle.set()

    async def close(self, grace: float) -> None:
        """Stops accepting, closes idle connections, lets the calls in flight finish within
        `grace` seconds, then cuts what is left."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            if not connection.busy:
                connection.close_idle()
        self._idle = asyncio.Event()
        self.maybe_idle()
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.warning("calls still in flight after %gs were cut short", grace)
        for connection in list(self.connections):
            connection.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            await self._server.wait_closed()


def _nothing() -> None:
    return None
