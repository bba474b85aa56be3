"""The data-plane HTTP listener's bounds on its clients, so that no client can hold the proxy.

aiohttp alone bounds none of these: it has no header timeout (a head trickled a byte at a
time holds its connection forever), keeps an idle connection for 3,630 s, and accepts every
connection (1,100 idle sockets locked every agent out). Here:

- `max_connections`: a connection beyond the cap is answered `503` and closed at once, before
  any byte of it is read (counted as refused, reason `max_connections`);
- `header_timeout`: once a request head has begun, all of it must arrive within this, or the
  connection is closed (`header_timeout`);
- `idle_timeout`: a keep-alive connection waiting for its next request (or a new one that has
  sent nothing) is closed after this (aiohttp's keep-alive timer);
- `agentproxy_connections{listener}` counts what is open;
- a client that goes away is told to whoever streams to it (`when_lost`), so that the
  upstream request it was reading is closed at once (MCP stream resumption needs the upstream
  to see it end).

The body's own bound (`listen.body_timeout`) is the shell's, where the body is read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from agentproxy.metering.metrics import Metrics

log = logging.getLogger("agentproxy.listener")

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

    __slots__ = ("_gauge", "_refused", "header_timeout", "max_connections", "open")

    def __init__(
        self, listener: str, metrics: Metrics, *, max_connections: int, header_timeout: float
    ) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
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


class BoundedServer(web.Server):
    """aiohttp's low-level server, whose connections are `BoundedHandler`s."""

    def __init__(self, handler: Any, *, bounds: ConnectionBounds, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.bounds = bounds

    def __call__(self) -> RequestHandler:
        return BoundedHandler(self, loop=self._loop, **self._kwargs)


class BoundedHandler(RequestHandler):
    """One client connection, admitted under the cap, its heads under a deadline."""

    def __init__(self, manager: BoundedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._bounds = manager.bounds
        self._admitted = False
        self._head_deadline: asyncio.TimerHandle | None = None
        self._lost = False
        self._on_lost: list[Callable[[], None]] = []

    def when_lost(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Calls `callback` once the client's connection is lost (at once if it already is),
        and returns what cancels that. aiohttp does not cancel a handler whose client left
        (and must not: records are written on the way out), so an exchange streaming an
        answer learns of it here instead of at its next write, which may never come."""
        if self._lost:
            callback()
            return _nothing
        self._on_lost.append(callback)

        def forget() -> None:
            if callback in self._on_lost:
                self._on_lost.remove(callback)

        return forget

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._bounds.admit():
            # Refused before aiohttp sees it: nothing is read, nothing is started.
            writable: Any = transport
            writable.write(_REFUSAL)
            transport.close()
            self._manager = None  # aiohttp's connection_lost then does nothing
            return
        self._admitted = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_deadline()
        if self._admitted:
            self._admitted = False
            self._bounds.release()
        super().connection_lost(exc)
        self._lost = True
        callbacks, self._on_lost = self._on_lost, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("a callback for a lost connection failed")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages or self._request_in_progress:
            # A head is complete (queued or being handled): its deadline is met. Bytes that
            # arrive now are its body (bounded by the shell's body timeout).
            self._cancel_deadline()
        elif data and self._head_deadline is None:
            # The first bytes of a head: all of it must follow within the header timeout.
            self._head_deadline = self._loop.call_later(
                self._bounds.header_timeout, self._head_timed_out
            )

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self._messages or self._request_in_progress:
            return
        self._bounds.refused("header_timeout")
        self.force_close()
        if self.transport is not None:
            self.transport.close()

    def _cancel_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None


def _nothing() -> None:
    return None
