"""gRPC server reflection through the proxy: the shell of a `ServerReflectionInfo` call
(v1 or v1alpha) on the proxy's gRPC listener.

There is no one upstream to forward such a stream to: grpcurl asks one stream for the list of
services, then for the files of each, and those live on different upstreams. So each request
of the caller's stream is answered from the upstreams' own reflection services, for what the
caller could ever be allowed to call (the check that filters MCP listings):

- `list_services`: every service the proxy routes to an upstream (its `match.service`, or
  what the default upstream lists and no other upstream serves) with at least one method
  this principal could be allowed to call; the union, sorted.
- `file_containing_symbol` of a service or method: asked of the upstream the proxy routes
  that service to; NOT_FOUND when the service or method could never be allowed (the same
  answer as for one that does not exist).
- anything else (a message type, a file name, extensions): asked of each upstream with such
  a service, in configuration order, until one knows it.
- every file returned loses the services and methods the principal could never call.

The upstreams are asked with their static credential (none for `credentials.token_exchange`:
that one is exchanged for a call to one upstream), never the caller's token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import grpc
from grpc import aio

from agentproxy.config.model import Upstream
from agentproxy.core import Call, Principal
from agentproxy.errors import BadRequest, MissingCredential
from agentproxy.policy import PolicySet, could_allow
from agentproxy.protocols import grpc_reflection as reflection
from agentproxy.proxy.context import upstream_credential
from agentproxy.proxy.grpc_refusal import answer_refusal
from agentproxy.proxy.grpc_upstreams import Channels
from agentproxy.proxy.runtime import Runtime

log = logging.getLogger("agentproxy.grpc")

# Never offered through the proxy: the proxy answers health itself, and reflection is this.
_OWN_SERVICES = frozenset({"grpc.health.v1.Health", *reflection.REFLECTION_SERVICES})


def is_reflection(service: str) -> bool:
    return service in reflection.REFLECTION_SERVICES


class ReflectionExchange:
    """One reflection stream: every request answered from the upstreams (module doc)."""

    def __init__(
        self, context: aio.ServicerContext[bytes, bytes], runtime: Runtime, channels: Channels
    ) -> None:
        self.context = context
        self.runtime = runtime
        self.channels = channels
        self._finished = False
        # Per stream: the upstream reflection calls, and what each upstream serves.
        self._calls: dict[str, Any] = {}
        self._services: dict[str, dict[str, tuple[str, ...]]] | None = None
        self._call: Call | None = None

    @property
    def responded(self) -> bool:
        return self._finished

    async def describe(self, call: Call) -> None:
        return None  # the action is the stream; each request is answered as allowed

    async def forward(self, call: Call) -> None:
        """Answers every request of the caller's stream, then ends it OK. Raises BadRequest
        for a request that is not a ServerReflectionRequest."""
        principal = call.principal
        if principal is None:
            raise MissingCredential()
        self._call = call
        context = self.context
        try:
            while True:
                message: object = await context.read()
                if message is aio.EOF:
                    break
                if not isinstance(message, bytes):
                    raise BadRequest("unexpected message type")
                call.bytes_in += len(message)
                answer = await self._answer(reflection.read_ask(message), principal)
                call.bytes_out += len(answer)
                await context.write(answer)
        finally:
            for upstream_call in self._calls.values():
                upstream_call.cancel()
        context.set_code(grpc.StatusCode.OK)
        call.grpc_status = 0
        call.status = 200
        self._finished = True

    async def refuse(self, call: Call) -> None:
        answer_refusal(self.context, call)
        self._finished = True

    async def _answer(self, ask: reflection.Ask, principal: Principal) -> bytes:
        policy = self.runtime.policy
        services = await self._allowed(principal)
        if ask.kind == "list_services":
            names = sorted({name for served in services.values() for name in served})
            return reflection.list_services_answer(ask, names)
        route = {name: upstream for upstream, served in services.items() for name in served}

        def keep_service(name: str) -> bool:
            return name in route

        def keep_method(service: str, method: str) -> bool:
            return _may_call(policy, principal, route[service], service, method)

        candidates = [u for u in self._grpc_upstreams() if u.name in services]
        question = ask.raw
        if ask.kind == "file_containing_symbol":
            service, method = self._service_of(ask.subject)
            if service is not None:
                upstream_name = route.get(service)
                if upstream_name is None or (
                    method is not None and not keep_method(service, method)
                ):
                    return reflection.not_found(ask)
                candidates = [u for u in candidates if u.name == upstream_name]
                # The file of a method is its service's (grpcio's servicer finds no method
                # symbols): asked as the service, answered as the method.
                question = reflection.symbol_request(service)
        for upstream in candidates:
            answer = await self._ask(upstream, question)
            try:
                if answer is None or reflection.answer_error(answer) is not None:
                    continue
                if question is not ask.raw:
                    answer = reflection.answering(answer, ask)
                return reflection.filter_files(answer, keep_service, keep_method)
            except ValueError as exc:
                log.warning(
                    "upstream %s sent a reflection answer we cannot read: %s", upstream.name, exc
                )
        return reflection.not_found(ask)

    def _service_of(self, symbol: str) -> tuple[str | None, str | None]:
        """(service, method) when `symbol` names a service the proxy routes, or one of its
        methods; (None, None) for any other symbol."""
        served = self._services or {}
        known = {name for names in served.values() for name in names}
        if symbol in known:
            return symbol, None
        parent, _, method = symbol.rpartition(".")
        if parent in known:
            return parent, method
        return None, None

    async def _allowed(self, principal: Principal) -> dict[str, dict[str, tuple[str, ...]]]:
        """Upstream name → {service → methods} that this principal could call some method
        of. What each upstream serves is read once per stream."""
        if self._services is None:
            self._services = await self._served()
        policy = self.runtime.policy
        return {
            upstream: {
                service: methods
                for service, methods in served.items()
                if any(_may_call(policy, principal, upstream, service, m) for m in methods)
            }
            for upstream, served in self._services.items()
        }

    async def _served(self) -> dict[str, dict[str, tuple[str, ...]]]:
        """Upstream name → {service → methods} the proxy routes to it."""
        runtime = self.runtime
        served: dict[str, dict[str, tuple[str, ...]]] = {}
        for upstream in self._grpc_upstreams():
            if upstream.service is not None:
                names: Sequence[str] = (upstream.service,)
            else:
                answer = await self._ask(upstream, reflection.list_request())
                try:
                    names = reflection.listed_services(answer) if answer is not None else ()
                except ValueError:
                    names = ()
                # Only what calls are routed here: a service another upstream serves is not
                # this one's to describe.
                names = [
                    n
                    for n in names
                    if n not in _OWN_SERVICES and runtime.grpc_routes.get(n) is None
                ]
            served[upstream.name] = {}
            for name in names:
                answer = await self._ask(upstream, reflection.symbol_request(name))
                try:
                    methods = reflection.described_services(answer) if answer else {}
                except ValueError:
                    methods = {}
                if name in methods:
                    served[upstream.name][name] = methods[name]
        return served

    def _grpc_upstreams(self) -> list[Upstream]:
        return [u for u in self.runtime.config.upstreams if u.is_grpc]

    async def _ask(self, upstream: Upstream, request: bytes) -> bytes | None:
        """One request on this stream's reflection call to `upstream`, its answer; None when
        the upstream has no reflection service or does not answer within its timeout."""
        upstream_call = self._calls.get(upstream.name)
        try:
            if upstream_call is None:
                metadata: list[tuple[str, str]] = []
                # The upstream's static credential; a per-call one (token_exchange) is the
                # caller's on one upstream, and this call is on none: asked without.
                credential = (
                    upstream_credential(self._call, upstream)
                    if upstream.token_exchange is None and self._call is not None
                    else None
                )
                if credential is not None:
                    metadata.append((credential[0].lower(), credential[1]))
                multicallable: Any = self.channels.get(upstream).stream_stream(
                    reflection.UPSTREAM_METHOD
                )
                upstream_call = multicallable(metadata=aio.Metadata(*metadata))
                self._calls[upstream.name] = upstream_call
            async with asyncio.timeout(upstream.timeout):
                await upstream_call.write(request)
                answer: object = await upstream_call.read()
        except (aio.AioRpcError, aio.UsageError, TimeoutError, asyncio.InvalidStateError) as exc:
            log.warning("reflection on upstream %s failed: %r", upstream.name, exc)
            self._calls.pop(upstream.name, None)
            if upstream_call is not None:
                upstream_call.cancel()
            return None
        return answer if isinstance(answer, bytes) else None


def _may_call(
    policy: PolicySet, principal: Principal, upstream: str, service: str, method: str
) -> bool:
    return could_allow(policy, f"grpc:/{service}/{method}", principal, upstream)
