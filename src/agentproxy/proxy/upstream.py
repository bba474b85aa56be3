"""HTTP/1.1 to the upstreams: aiohttp's own protocol, parser and writer, with keep-alive pools.

Measured in process against nginx (16 connections, small GETs), a request through
`aiohttp.ClientSession` costs ~80 µs of CPU; the same exchange on the same protocol driven
directly costs ~35. The difference is what a proxy never uses: cookies, redirects, auth,
proxies, auto headers, tracing, middleware. So this module drives aiohttp's `ResponseHandler`
(the protocol and C response parser its client runs on) and `StreamWriter` (its request
serializer, which refuses CR and LF in header values) itself, and keeps idle connections per
origin the way aiohttp's connector does:

- one connection per call in flight, reused (most recent first) once its answer was read to
  the end and neither side asked to close; idle ones are closed after `KEEPALIVE` seconds;
- a bodiless idempotent request that finds its reused connection closed under it is sent
  once more on a new one (RFC 9112 §9.3.1.1), as aiohttp's client does;
- a streamed request body is sent by its own task while the answer is awaited (an upstream
  may answer early); its `Content-Length` is kept when the agent sent one, else it is
  chunked. A body read whole (MCP, LLM) gets its own length and, up to 64 KiB, goes out in
  one write with the head;
- `seconds` bounds the connect and every read (aiohttp's `sock_connect` and `sock_read`);
- https upstreams are verified against the system's CAs, with the URL's host name.

Errors are aiohttp's: `aiohttp.ClientError` (refused, reset, closed early), `TimeoutError`,
and `HttpProcessingError` for an answer that is not HTTP. `ResponseHandler` is not part of
aiohttp's documented API: tests/proxy/test_upstream_connections.py and the HTTP suite are
what an aiohttp upgrade must pass (pyproject keeps aiohttp below 4).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import ClientConnectionError, ClientOSError, ServerDisconnectedError
from aiohttp.client_proto import ResponseHandler
from aiohttp.http import HttpProcessingError, RawResponseMessage, StreamWriter
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

KEEPALIVE = 15.0  # aiohttp's connector default
_BODILESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})  # no Content-Length: 0
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# A whole body up to this size goes out with the head before the answer is awaited: it fits
# the transport's buffer, so the write never waits for the upstream to read. Larger ones (and
# streamed ones) are sent by a task, so that an upstream answering early is heard.
_INLINE_BODY = 64 * 1024

__all__ = ["KEEPALIVE", "HttpProcessingError", "Origin", "UpstreamAnswer", "UpstreamClient"]


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an upstream URL's requests go, and the Host header they carry."""

    scheme: str
    host: str
    port: int
    host_header: str


@functools.lru_cache(maxsize=256)
def origin_of(url: str) -> tuple[Origin, str]:
    """The origin of an upstream's base URL and the path the URL adds before every call's own
    ("" for none), as written. The config loader allows http(s) URLs with a host and no user
    info, query or fragment; anything else raises ValueError."""
    parsed = URL(url)
    if (
        parsed.scheme not in ("http", "https")
        or not parsed.raw_host
        or parsed.port is None
        or parsed.user is not None
        or parsed.raw_query_string
        or parsed.raw_fragment
    ):
        raise ValueError(f"not an http(s) upstream URL: {url!r}")
    host_header = parsed.raw_host
    if ":" in host_header:  # an IPv6 literal
        host_header = f"[{host_header}]"
    if not parsed.is_default_port():
        host_header += f":{parsed.port}"
    path_starts = url.find("/", len(parsed.scheme) + 3)  # past "scheme://"
    base = "" if path_starts < 0 else url[path_starts:]
    return Origin(parsed.scheme, parsed.raw_host, parsed.port, host_header), base


class UpstreamAnswer:
    """An upstream's answer: status, headers and the body as it streams. `release()` when
    done: the connection goes back to its pool if the body was read to the end."""

    __slots__ = ("_client", "_origin", "_protocol", "_released", "_sender", "content", "message")

    def __init__(
        self,
        client: UpstreamClient,
        origin: Origin,
        protocol: ResponseHandler,
        message: RawResponseMessage,
        content: StreamReader,
        sender: asyncio.Task[None] | None,
    ) -> None:
        self._client = client
        self._origin = origin
        self._protocol = protocol
        self._sender = sender
        self._released = False
        self.message = message
        self.content = content

    @property
    def status(self) -> int:
        return self.message.code

    @property
    def reason(self) -> str:
        return self.message.reason

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self.message.headers

    def abandon(self) -> None:
        """Closes the connection now, mid-answer (the caller went away): the upstream sees its
        request end, and a read of `content` waiting for more raises ClientConnectionError
        (closing alone would leave it waiting: aiohttp detaches the reader first)."""
        if self._released:
            return
        self._released = True
        sender = self._sender
        if sender is not None and not sender.done():
            sender.cancel()
        self.content.set_exception(ClientConnectionError("the caller went away"))
        self._protocol.close()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        sender = self._sender
        if sender is not None and not sender.done():
            # The answer ended (or was abandoned) before the request body did: the
            # connection is mid-request and cannot carry another.
            sender.cancel()
            self._protocol.close()
            return
        if self.content.is_eof():
            self._client._put(self._origin, self._protocol)
        else:
            self._protocol.close()


class UpstreamClient:
    """Keep-alive pools of HTTP/1.1 connections, one per upstream origin (see the module)."""

    def __init__(self) -> None:
        self._idle: dict[Origin, collections.deque[tuple[ResponseHandler, float]]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    async def request(
        self,
        origin: Origin,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: AsyncIterator[bytes] | bytes | None,
        seconds: float,
    ) -> UpstreamAnswer:
        """Sends the request (`target`: path and query, already encoded) and returns once the
        answer's head arrived (1xx interim answers skipped); `seconds` bounds the connect and
        every read. `headers` must not carry Host or Transfer-Encoding (set here); a body
        given whole gets its own Content-Length. Raises aiohttp.ClientError, TimeoutError or
        HttpProcessingError; the connection is closed then, never reused."""
        fields = CIMultiDict(headers)
        fields["Host"] = origin.host_header
        chunked = False
        if isinstance(body, bytes):
            fields["Content-Length"] = str(len(body))
        elif body is None:
            if method not in _BODILESS and "Content-Length" not in fields:
                fields["Content-Length"] = "0"
        elif "Content-Length" not in fields:
            fields["Transfer-Encoding"] = "chunked"
            chunked = True
        head = f"{method} {target} HTTP/1.1"
        retry = not isinstance(body, AsyncIterator) and method in _IDEMPOTENT
        while True:
            protocol, reused = await self._connection(origin, seconds)
            try:
                return await self._exchange(
                    origin, protocol, method == "HEAD", head, fields, body, chunked, seconds
                )
            except (ServerDisconnectedError, ClientOSError):
                if not (reused and retry):
                    raise
                retry = False

    async def close(self) -> None:
        """Closes the idle connections; those in use close when released."""
        self._closed = True
        for idle in self._idle.values():
            for protocol, _ in idle:
                protocol.close()
        self._idle.clear()

    async def _exchange(
        self,
        origin: Origin,
        protocol: ResponseHandler,
        head_only: bool,
        head: str,
        fields: CIMultiDict[str],
        body: AsyncIterator[bytes] | bytes | None,
        chunked: bool,
        seconds: float,
    ) -> UpstreamAnswer:
        loop = asyncio.get_running_loop()
        sender: asyncio.Task[None] | None = None
        try:
            protocol.set_response_params(
                skip_payload=head_only, auto_decompress=False, read_timeout=seconds
            )
            writer = StreamWriter(protocol, loop)
            if chunked:
                writer.enable_chunking()
            await writer.write_headers(head, fields)
            if body is None:
                writer.set_eof()
                protocol.start_timeout()
            elif isinstance(body, bytes) and len(body) <= _INLINE_BODY:
                await writer.write_eof(body)  # one write with the head; never waits to drain
                protocol.start_timeout()
            else:
                sender = loop.create_task(_send(protocol, writer, body))
                # The upstream's silence is counted while the body is still being sent: a
                # body trickled to it holds one of its workers at most `seconds`.
                protocol.start_timeout()
            while True:
                message, content = await protocol.read()
                if not 100 <= message.code < 200 or message.code == 101:
                    break
        except BaseException:
            if sender is not None:
                sender.cancel()
            protocol.close()
            raise
        return UpstreamAnswer(self, origin, protocol, message, content, sender)

    async def _connection(self, origin: Origin, seconds: float) -> tuple[ResponseHandler, bool]:
        loop = asyncio.get_running_loop()
        idle = self._idle.get(origin)
        while idle:
            protocol, since = idle.pop()
            if loop.time() - since < KEEPALIVE and _reusable(protocol):
                return protocol, True
            protocol.close()
        secure = origin.scheme == "https"
        if secure and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            async with asyncio.timeout(seconds):
                _, protocol = await loop.create_connection(
                    functools.partial(ResponseHandler, loop),
                    origin.host,
                    origin.port,
                    ssl=self._ssl if secure else None,
                    server_hostname=origin.host if secure else None,
                )
        except OSError as exc:
            raise ClientOSError(
                exc.errno, f"cannot connect to {origin.host_header}: {exc}"
            ) from None
        return protocol, False

    def _put(self, origin: Origin, protocol: ResponseHandler) -> None:
        if self._closed or not _reusable(protocol):
            protocol.close()
            return
        now = asyncio.get_running_loop().time()
        idle = self._idle.setdefault(origin, collections.deque())
        while idle and now - idle[0][1] >= KEEPALIVE:  # the oldest first
            idle.popleft()[0].close()
        idle.append((protocol, now))


def _reusable(protocol: ResponseHandler) -> bool:
    return protocol.is_connected() and not protocol.should_close


async def _send(
    protocol: ResponseHandler, writer: StreamWriter, body: AsyncIterator[bytes] | bytes
) -> None:
    """Streams the request body; a failure ends the exchange (the answer's read raises it)
    and cuts the connection, so the upstream never sees a complete request."""
    try:
        if isinstance(body, bytes):
            await writer.write_eof(body)
        else:
            async for chunk in body:
                await writer.write(chunk)
            await writer.write_eof()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        protocol.set_exception(ClientConnectionError(f"request body not sent: {exc!r}"), exc)
        protocol.close()
        return
    protocol.start_timeout()
