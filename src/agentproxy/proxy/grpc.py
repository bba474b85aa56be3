"""The gRPC data plane: a grpc.aio shell around the gRPC adapter and the pipeline.

Every method of every service is proxied without knowing it in advance: messages stay bytes
(no serializers) and every call, unary or streaming, is a bidirectional stream on the wire,
so one handler serves all four kinds. Metadata, trailers, status code and details pass both
ways; the remaining deadline (not the original) travels upstream; a cancelled caller cancels
the upstream call, and an upstream's cancellation reaches the caller as its status.

Compression is per hop: grpcio decodes what it receives without saying how it was encoded, so
compressed messages are accepted from both sides and sent on uncompressed (on loopback,
compressing twice would only cost CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import grpc
from grpc import aio

from agentproxy.clock import Clock
from agentproxy.config.model import Upstream
from agentproxy.core import Action, Call, Facts
from agentproxy.errors import (
    BadRequest,
    Denied,
    NoRoute,
    PayloadTooLarge,
    Refusal,
    UpstreamFailed,
)
from agentproxy.policy import decide_next_message
from agentproxy.protocols import grpc as adapter
from agentproxy.protocols.http import parse_declared_task
from agentproxy.proxy.context import context_headers, credential_header, upstream_credential
from agentproxy.proxy.grpc_reflection import ReflectionExchange, is_reflection
from agentproxy.proxy.grpc_refusal import answer_refusal
from agentproxy.proxy.grpc_upstreams import Channels, Descriptors
from agentproxy.proxy.pipeline import Pipeline, start_call
from agentproxy.proxy.runtime import Runtime

log = logging.getLogger("agentproxy.grpc")

UNPARSED = Action("grpc", "?", "<unparsed>", name="grpc:<unparsed>")
_EOF_CONFIRMATIONS = 2


def _text(metadata: Sequence[tuple[str, str | bytes]], key: str) -> str | None:
    """The first text value of `key` (trace context: a second copy is ignored, as on HTTP)."""
    return next((v for k, v in metadata if k == key and isinstance(v, str)), None)


def peer_address(peer: str) -> str | None:
    """grpcio's `ipv4:10.0.0.1:5555` / `ipv6:[::1]:5555` → the address (as HTTP's
    X-Forwarded-For gives it); None for other transports (unix sockets)."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6") or ":" not in rest:
        return None
    return rest.rsplit(":", 1)[0].strip("[]")


class GrpcDataPlane(grpc.GenericRpcHandler):
    """Answers every method the health service does not: each call walks the pipeline."""

    def __init__(
        self, current: Callable[[], Pipeline], channels: Channels, descriptors: Descriptors
    ) -> None:
        self._current = current
        self._channels = channels
        self._descriptors = descriptors

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        details: Any = handler_call_details
        method, metadata = details.method, tuple(details.invocation_metadata or ())
        if self._is_unary(method):
            # A method the descriptor set calls unary takes grpcio's unary path on both
            # sides: fewer operations per call than a stream (measured: bench/grpc_overhead.py).
            return grpc.unary_unary_rpc_method_handler(partial(self.handle_unary, method, metadata))
        return grpc.stream_stream_rpc_method_handler(partial(self.handle, method, metadata))

    def _is_unary(self, method: str) -> bool:
        runtime = self._current().runtime
        try:
            upstream = runtime.route_grpc(method[1:].partition("/")[0])
        except NoRoute:
            return False  # refused on the stream path, which reads nothing
        methods = self._descriptors.known(runtime, upstream)
        described = methods.get(method) if methods is not None else None
        return (
            described is not None
            and not described.client_streaming
            and not described.server_streaming
        )

    async def handle_unary(
        self,
        method: str,
        metadata: Sequence[tuple[str, str | bytes]],
        request: bytes,
        context: aio.ServicerContext[bytes, bytes],
    ) -> bytes | None:
        exchange = await self.handle(method, metadata, None, context, unary=request)
        return exchange.response if exchange is not None else None

    async def handle(
        self,
        method: str,
        metadata: Sequence[tuple[str, str | bytes]],
        _requests: object,
        context: aio.ServicerContext[bytes, bytes],
        *,
        unary: bytes | None = None,
    ) -> GrpcExchange | None:
        pipeline = self._current()
        clock = pipeline.clock
        started = clock.monotonic()
        runtime = pipeline.runtime
        action, upstream, bearer, declared = UNPARSED, None, None, None
        refusal: Refusal | None = None
        reflecting = False
        try:
            action = adapter.describe(method)
            # Reflection is answered for every upstream at once (grpc_reflection.py).
            reflecting = is_reflection(action.operation)
            if not reflecting:
                upstream = runtime.route_grpc(action.operation)
                action = replace(action, upstream=upstream.name)
            bearer = adapter.bearer(metadata)
            task = adapter.declared_task(metadata)
            if isinstance(task, bytes):
                raise BadRequest("x-agentproxy-task must be text")
            declared = parse_declared_task(task)
        except Refusal as exc:
            refusal = exc
        call = start_call(
            action,
            upstream.name if upstream else "-",
            started=started,
            now=clock.now(),
            bearer=bearer,
            declared_task=declared,
            refusal=refusal,
            traceparent=_text(metadata, "traceparent"),
            tracestate=_text(metadata, "tracestate"),
        )
        if reflecting:
            await pipeline.run(call, ReflectionExchange(context, runtime, self._channels))
            return None
        exchange = GrpcExchange(
            context, runtime, upstream, metadata, self._channels, self._descriptors, clock, unary
        )
        await pipeline.run(call, exchange)
        return exchange


class GrpcExchange:
    """One gRPC call's shell: forwards it upstream or answers its refusal as a status."""

    def __init__(
        self,
        context: aio.ServicerContext[bytes, bytes],
        runtime: Runtime,
        upstream: Upstream | None,
        metadata: Sequence[tuple[str, str | bytes]],
        channels: Channels,
        descriptors: Descriptors,
        clock: Clock,
        unary: bytes | None = None,
    ) -> None:
        """`unary`: the request of a unary call (grpcio read it); None: a stream to read."""
        self.context = context
        self.runtime = runtime
        self.upstream = upstream
        self.metadata = metadata
        self.channels = channels
        self.descriptors = descriptors
        self.clock = clock
        self.unary = unary
        self.response: bytes | None = None  # a unary call's answer
        self._first: bytes | None = None  # read by describe, sent first by forward
        self._method: adapter.Method | None = None  # a request stream's, to decide each message
        self._finished = False
        self._send_failure: Refusal | None = None

    @property
    def responded(self) -> bool:
        # A gRPC call can always still end with a status: only a set status is final.
        return self._finished

    async def describe(self, call: Call) -> None:
        """With a descriptor set for the upstream, reads the first request message and
        decodes it into `args`; the message is forwarded as read. Raises BadRequest for one
        that does not decode, Unavailable when reflection cannot be read."""
        upstream = self.upstream
        if upstream is None:
            return
        methods = await self.descriptors.methods(self.runtime, upstream)
        method = methods.get(call.action.target) if methods is not None else None
        if method is None:
            return
        first = self.unary if self.unary is not None else await self._read(call, upstream)
        if first is None:
            return
        self._first = first
        call.action = replace(call.action, args=adapter.decode_args(method, first))
        if method.client_streaming:
            # Every later message is decided too, as it arrives (in _send).
            self._method = method
            call.streaming = True

    async def _read(self, call: Call, upstream: Upstream) -> bytes | None:
        """The caller's next message, None at the end. Raises PayloadTooLarge past the
        upstream's `max_message_bytes` (the listener's own limit is the largest of all)."""
        message: object = await self.context.read()
        if message is aio.EOF:
            # grpcio reports a failed read (a message over the listener's limit) as EOF, then
            # cancels the handler; more reads tell them apart (a real end answers EOF at
            # once, a failed call raises CancelledError), so a cut-off stream is never
            # half-closed upstream as if it were complete. The cancellation comes through
            # grpcio's completion queue like the reads do, in no set order with them: each
            # read and loop turn gives it a chance to land first (one was not always enough
            # on a loaded machine).
            for _ in range(_EOF_CONFIRMATIONS):
                confirmed: object = await self.context.read()
                if confirmed is not aio.EOF:
                    raise BadRequest("a message arrived after the end of the request stream")
                await asyncio.sleep(0)
            return None
        if not isinstance(message, bytes):
            raise BadRequest("unexpected message type")
        if len(message) > upstream.max_message_bytes:
            raise PayloadTooLarge(
                f"request message is {len(message)} bytes; the limit is "
                f"{upstream.max_message_bytes}"
            )
        call.bytes_in += len(message)
        return message

    def _upstream_metadata(self, call: Call, upstream: Upstream) -> list[tuple[str, str | bytes]]:
        header = credential_header(upstream)
        strip = frozenset({header.lower()}) if header is not None else frozenset()
        metadata = adapter.metadata_to_forward(self.metadata, strip=strip)
        address = peer_address(self.context.peer())
        if address is not None:
            metadata.append(("x-forwarded-for", address))
        metadata.extend(
            (name.lower(), value)
            # gRPC is HTTP/2 POST to /package.Service/Method (the gRPC over HTTP/2 spec).
            for name, value in context_headers(
                call, self.runtime.signer, method="POST", path=call.action.target
            )
        )
        credential = upstream_credential(call, upstream)
        if credential is not None:
            metadata.append((credential[0].lower(), credential[1]))
        return metadata

    async def forward(self, call: Call) -> None:
        """Streams the caller's messages up and the upstream's back; ends the call with the
        upstream's status, trailers and details. Raises UpstreamFailed when the upstream
        cannot be reached, PayloadTooLarge for a request message past the upstream's limit."""
        upstream = self.upstream
        if upstream is None:
            raise UpstreamFailed("no upstream chosen")
        if self.unary is not None:
            await self._forward_unary(call, upstream, self.unary)
            return
        context = self.context
        remaining = context.time_remaining()
        multicallable: Any = self.channels.get(upstream).stream_stream(call.action.target)
        sent = self.clock.monotonic()
        upstream_call: Any = multicallable(
            metadata=aio.Metadata(*self._upstream_metadata(call, upstream)),
            timeout=remaining,
        )
        sender = asyncio.ensure_future(self._send(call, upstream, upstream_call))
        headers_sent = False
        try:
            initial = await upstream_call.initial_metadata()
            while True:
                message = await upstream_call.read()
                if message is aio.EOF:
                    break
                if not headers_sent:
                    await context.send_initial_metadata(adapter.metadata_to_return(initial))
                    headers_sent = True
                call.bytes_out += len(message)
                await context.write(message)
        except aio.AioRpcError:
            pass  # the status is read below
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._send_failure is None or (task is not None and task.cancelling()):
                # The caller went away or its deadline passed: the upstream call goes too.
                upstream_call.cancel()
                raise
            # _send refused a message and cancelled the upstream call (grpcio reads of a
            # cancelled call raise CancelledError): the refusal below ends the caller's call.
        finally:
            call.upstream_seconds = self.clock.monotonic() - sent
            if not sender.done():
                sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        if self._send_failure is not None:
            raise self._send_failure
        await self._finish(call, upstream, upstream_call, initial, headers_sent)

    async def _forward_unary(self, call: Call, upstream: Upstream, request: bytes) -> None:
        """One message up, one answer (or none) back, with the same metadata and status."""
        if len(request) > upstream.max_message_bytes:
            raise PayloadTooLarge(
                f"request message is {len(request)} bytes; the limit is "
                f"{upstream.max_message_bytes}"
            )
        call.bytes_in += len(request)
        multicallable: Any = self.channels.get(upstream).unary_unary(call.action.target)
        sent = self.clock.monotonic()
        upstream_call: Any = multicallable(
            request,
            metadata=aio.Metadata(*self._upstream_metadata(call, upstream)),
            timeout=self.context.time_remaining(),
        )
        try:
            self.response = await upstream_call
            call.bytes_out += len(self.response or b"")
        except aio.AioRpcError:
            self.response = None  # the status is read below
        except asyncio.CancelledError:
            upstream_call.cancel()
            raise
        finally:
            call.upstream_seconds = self.clock.monotonic() - sent
        await self._finish(call, upstream, upstream_call, await upstream_call.initial_metadata())

    async def _finish(
        self,
        call: Call,
        upstream: Upstream,
        upstream_call: Any,
        initial: Any,
        headers_sent: bool = False,
    ) -> None:
        """Ends the caller's call as the upstream ended its own: initial metadata (if not
        sent yet), trailers, code and details. Raises UpstreamFailed when the upstream could
        not be reached at all (the proxy's own UNAVAILABLE, with the decision id)."""
        context = self.context
        code = await upstream_call.code()
        details = await upstream_call.details()
        if code is grpc.StatusCode.UNAVAILABLE and not headers_sent:
            log.warning("upstream %s unavailable for call %s: %s", upstream.name, call.id, details)
            if not initial:
                raise UpstreamFailed(f"upstream {upstream.name} is unavailable: {details}")
        if not headers_sent:
            await context.send_initial_metadata(adapter.metadata_to_return(initial))
        trailing = await upstream_call.trailing_metadata()
        context.set_trailing_metadata(tuple(adapter.metadata_to_return(trailing)))
        context.set_code(code)
        if details:
            context.set_details(details)
        call.grpc_status = code.value[0]
        call.status = adapter.HTTP_STATUS[adapter.Code(call.grpc_status)]
        if code is not grpc.StatusCode.OK:
            call.error = f"upstream status {code.name}"
            self.response = None
        self._finished = True

    async def _send(self, call: Call, upstream: Upstream, upstream_call: Any) -> None:
        """Caller → upstream, message by message, then half-close. A message past the limit
        cancels the upstream call (it never sees a truncated stream as complete)."""
        try:
            if self._first is not None:
                await upstream_call.write(self._first)
            while (message := await self._read(call, upstream)) is not None:
                self._decide_message(call, message)
                await upstream_call.write(message)
            await upstream_call.done_writing()
        except Refusal as exc:
            self._send_failure = exc
            upstream_call.cancel()
        except (aio.AioRpcError, aio.UsageError, asyncio.InvalidStateError):
            pass  # the upstream already ended the call; its status says why

    def _decide_message(self, call: Call, message: bytes) -> None:
        """A later message of a request stream, decided on its own arguments before it is
        forwarded. Raises the Refusal (enforce mode) that ends the call; in shadow mode the
        message goes on and the call records what would have stopped it."""
        method = self._method
        if method is None:
            return
        principal = call.principal
        if principal is None:
            raise Denied("a streaming call has no principal")
        action = replace(call.action, args=adapter.decode_args(method, message))
        facts = call.facts if call.facts is not None else Facts(task_id=call.task)
        first = call.decision.rule_id if call.decision is not None else None
        refused = decide_next_message(
            self.runtime.policy, action, principal, facts, self.clock.now(), first
        )
        if refused is None:
            return
        reason, rule = refused
        if call.enforced:
            raise Denied(reason, rule=rule)
        call.error = f"shadow: {reason}"

    async def refuse(self, call: Call) -> None:
        answer_refusal(self.context, call)
        self._finished = True
