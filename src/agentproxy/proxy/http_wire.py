"""The data plane's HTTP/1.1 messages: a request as the listener parsed it (`Request`, its
`Body` arriving), and the answers the exchanges build (`Response`, read whole and sent in one
write with its head; `StreamResponse`, its head sent at once and its body as it comes).

The listener (`proxy/listener.py`) owns the socket and the parser; these objects are what
the exchanges see of it. Their names and behaviour follow aiohttp's `web` objects, which the
data plane ran on before: `Response.headers` is a `CIMultiDict`, a `Content-Length` the
headers carry is kept, `Date` and `Server` are set unless present, a body a method or status
must not have is never sent (HEAD, 1xx, 204, 304), and a streamed answer without a length is
chunked (HTTP/1.1) or ends with the connection (HTTP/1.0).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from agentproxy.clock import Clock

# A body buffers up to this many bytes before the connection stops reading (the kernel's
# window then slows the client); reading it below LOW reads on.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024

_REASONS = {status.value: status.phrase for status in HTTPStatus}
_EMPTY_STATUS = frozenset((204, 304, *range(100, 200)))
# A whole answer's body up to this size is copied after its head; a larger one is not.
_COPIED = 16 * 1024


class HttpConnection(Protocol):
    """What the messages need of the listener's connection (`listener.HttpConnection`)."""

    clock: Clock
    peer: str | None

    @property
    def transport(self) -> asyncio.Transport | None: ...

    def write(self, data: bytes) -> None: ...

    def writelines(self, data: tuple[bytes, ...]) -> None: ...

    async def drain(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def when_lost(self, callback: Callable[[], None]) -> Callable[[], None]: ...


class Body:
    """A request body as it arrives: fed by the connection, read by the exchange."""

    __slots__ = ("_chunks", "_connection", "_eof", "_error", "_paused", "_size", "_waiter")

    def __init__(self, connection: HttpConnection | None) -> None:
        self._connection = connection
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER and not self._paused and self._connection is not None:
            self._paused = True
            self._connection.pause_reading()
        self._wake()

    def end(self) -> None:
        self._eof = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        """The connection was lost before the body ended: readers get `exc`."""
        if not self._eof:
            self._error = exc
            self._eof = True
            self._wake()

    def is_eof(self) -> bool:
        """Whether all of it has arrived (read or not)."""
        return self._eof

    async def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (-1: whatever is buffered) once some have arrived; b"" at the end.
        Raises ClientLeft (a ConnectionResetError) when the client left before the end, or
        the Refusal the listener found in the body (an invalid chunk, a trailer too large)."""
        while not self._chunks:
            if self._eof:
                if self._error is not None:
                    raise self._error
                return b""
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        if 0 <= n < len(chunk):
            self._chunks.appendleft(chunk[n:])
            chunk = chunk[:n]
        self._size -= len(chunk)
        if self._paused and self._size < LOW_WATER:
            self._resume()
        return chunk

    def _resume(self) -> None:
        if self._paused and self._connection is not None:
            self._paused = False
            self._connection.resume_reading()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


EMPTY_BODY = Body(None)
EMPTY_BODY.end()


class Request:
    """One request as the listener parsed it. `raw_path` is the request target exactly as
    sent (decoded as UTF-8 with surrogate escapes, as aiohttp did), `headers` in their order,
    duplicates kept."""

    __slots__ = (
        "body_exists",
        "connection",
        "content",
        "content_length",
        "headers",
        "keep_alive",
        "method",
        "raw_path",
        "version",
    )

    scheme = "http"

    def __init__(
        self,
        connection: HttpConnection,
        method: str,
        raw_path: str,
        version: tuple[int, int],
        headers: CIMultiDictProxy[str],
        *,
        content: Body,
        content_length: int | None,
        body_exists: bool,
        keep_alive: bool,
    ) -> None:
        self.connection = connection
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.headers = headers
        self.content = content
        self.content_length = content_length
        self.body_exists = body_exists
        self.keep_alive = keep_alive

    @property
    def remote(self) -> str | None:
        return self.connection.peer

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.connection.transport

    def when_lost(self, callback: Callable[[], None]) -> Callable[[], None]:
        """`callback` once the client's connection is lost; returns what cancels that."""
        return self.connection.when_lost(callback)

    def send_continue(self) -> None:
        """`100 Continue` (RFC 9110 §10.1.1), before the body is read."""
        self.connection.write(b"HTTP/1.1 100 Continue\r\n\r\n")


class StreamResponse:
    """An answer whose head is sent at `prepare` and whose body follows as written."""

    def __init__(
        self,
        *,
        status: int = 200,
        reason: str | None = None,
        headers: Iterable[tuple[str, str]] | Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers: CIMultiDict[str] = CIMultiDict(headers) if headers else CIMultiDict()
        self.keep_alive = True
        self._request: Request | None = None
        self._chunked = False
        self._empty = False
        self._eof_sent = False

    @property
    def prepared(self) -> bool:
        return self._request is not None

    @property
    def eof_sent(self) -> bool:
        return self._eof_sent

    def force_close(self) -> None:
        """The connection closes after this answer."""
        self.keep_alive = False

    async def prepare(self, request: Request) -> None:
        if self._request is not None:
            return
        self._request = request
        self._empty = _must_be_empty(request.method, self.status)
        headers = self.headers
        if self._empty:
            headers.popall("Transfer-Encoding", None)
            if self.status in _EMPTY_STATUS:
                headers.popall("Content-Length", None)
        elif "Content-Length" not in headers:
            if request.version >= (1, 1):
                self._chunked = True
                headers["Transfer-Encoding"] = "chunked"
            else:
                self.keep_alive = False  # the body ends with the connection
        connection = request.connection
        connection.write(self._head(request))
        await connection.drain()

    async def write(self, data: bytes) -> None:
        """Raises ConnectionResetError once the client has gone."""
        request = self._request
        if request is None:
            raise RuntimeError("write() before prepare()")
        if self._eof_sent:
            raise RuntimeError("write() after write_eof()")
        if not data or self._empty:
            return
        connection = request.connection
        if self._chunked:
            connection.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            connection.write(data)
        await connection.drain()

    async def write_eof(self) -> None:
        request = self._ending()
        if request is not None and self._chunked:
            request.connection.write(b"0\r\n\r\n")
            await request.connection.drain()

    def _ending(self) -> Request | None:
        """The request this answer ends now, None if it already has. Raises RuntimeError
        before `prepare`."""
        request = self._request
        if request is None:
            raise RuntimeError("write_eof() before prepare()")
        if self._eof_sent:
            return None
        self._eof_sent = True
        return request

    def _head(self, request: Request) -> bytes:
        headers = self.headers
        if "Date" not in headers:
            headers["Date"] = http_date(request.connection.clock.now())
        if "Server" not in headers:
            headers["Server"] = "agentproxy"
        keep_alive = self.keep_alive and request.keep_alive
        if "Connection" not in headers:
            if not keep_alive and request.version >= (1, 1):
                headers["Connection"] = "close"
            elif keep_alive and request.version < (1, 1):
                headers["Connection"] = "keep-alive"
        return serialize_head(request.version, self.status, self.reason, headers.items())


class Response(StreamResponse):
    """An answer read whole: its head and body go out in one write at `write_eof` (or when
    the handler returns it unsent)."""

    def __init__(
        self,
        *,
        status: int = 200,
        reason: str | None = None,
        body: bytes = b"",
        headers: Iterable[tuple[str, str]] | Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> None:
        super().__init__(status=status, reason=reason, headers=headers)
        self.body = body
        if content_type is not None:
            self.headers["Content-Type"] = content_type

    async def prepare(self, request: Request) -> None:
        # Nothing is sent yet: the head waits for the body, to leave in the same write.
        if self._request is None:
            self._request = request
            self._empty = _must_be_empty(request.method, self.status)

    async def write(self, data: bytes) -> None:
        raise RuntimeError("a Response is sent whole: set its body")

    async def write_eof(self) -> None:
        request = self._ending()
        if request is None:
            return
        headers = self.headers
        body = self.body
        if self.status in _EMPTY_STATUS:
            headers.popall("Content-Length", None)
        elif "Content-Length" not in headers and (
            body or (self.status != 304 and request.method != "HEAD")
        ):
            headers["Content-Length"] = str(len(body))
        headers.popall("Transfer-Encoding", None)
        if body and not self._empty and "Content-Type" not in headers:
            headers["Content-Type"] = "application/octet-stream"  # RFC 9110 §8.3
        head = self._head(request)
        connection = request.connection
        if not body or self._empty:
            connection.write(head)
        elif len(body) <= _COPIED:
            connection.write(head + body)  # one buffer, one send
        else:
            connection.writelines((head, body))  # one send too (writev), without the copy
        await connection.drain()


def _must_be_empty(method: str, status: int) -> bool:
    return status in _EMPTY_STATUS or method == "HEAD" or (method == "CONNECT" and status < 300)


def serialize_head(
    version: tuple[int, int], status: int, reason: str | None, headers: Iterable[tuple[str, str]]
) -> bytes:
    """The status line and header block. Raises ValueError for a CR or LF inside a reason,
    name or value (one would end the head early: response splitting)."""
    lines = [f"HTTP/{version[0]}.{version[1]} {status} {reason or _REASONS.get(status, '')}"]
    lines.extend([f"{name}: {value}" for name, value in headers])
    lines.append("\r\n")
    block = "\r\n".join(lines)
    separators = len(lines)  # one CRLF between lines, and the closing one
    if block.count("\n") != separators or block.count("\r") != separators:
        raise ValueError("a CR or LF inside the status line or a header of an answer")
    return block.encode("utf-8", "surrogateescape")


_date: list[Any] = [0, ""]


def http_date(epoch: float) -> str:
    """The IMF-fixdate of `epoch` (RFC 9110 §5.6.7), formatted once a second."""
    second = int(epoch)
    if _date[0] != second:
        _date[0], _date[1] = second, formatdate(second, usegmt=True)
    return str(_date[1])
