"""The one loop every call walks, whatever its protocol, and for explain and Check too.

The protocol shell describes the call (builds the `Call`), then hands it to `Pipeline.run`
with an `Exchange`: the shell's way to forward the call or answer a refusal in its own wire
format. The stages are small objects (`proxy/stages/`); `proxy/assemble.py` is the one place
their order is written. This module only walks them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Protocol

from agentproxy.clock import Clock
from agentproxy.core import Action, Call
from agentproxy.errors import InternalError, Refusal
from agentproxy.protocols.http import parse_traceparent
from agentproxy.proxy.runtime import Runtime
from agentproxy.telemetry import Tracing

log = logging.getLogger("agentproxy.pipeline")


class Exchange(Protocol):
    """The protocol shell of one call."""

    @property
    def responded(self) -> bool:
        """True once anything was sent to the caller (a refusal can no longer be rendered)."""

    async def describe(self, call: Call) -> None:
        """Completes `call.action` from what only an authenticated caller may make the proxy
        read (an MCP body: the JSON-RPC message names the tool); a no-op for plain HTTP.
        Raises Refusal for a body that cannot be described unambiguously."""

    async def forward(self, call: Call) -> None:
        """Sends the call upstream and streams the answer back. Raises Refusal before responding."""

    async def refuse(self, call: Call) -> None:
        """Answers `call.refusal` in the protocol's own shape."""


class Stage(Protocol):
    """One step before forwarding: sets `call.refusal` (or raises a Refusal) to stop the call."""

    async def __call__(self, call: Call, exchange: Exchange) -> None: ...


class Finisher(Protocol):
    """One step after the answer (or the refusal), on every path. Never raises."""

    async def __call__(self, call: Call) -> None: ...


class Pipeline:
    """The stages of one runtime snapshot, built whole by `assemble`; in-flight calls keep the
    pipeline they started with, and with it every setting its stages were built from."""

    __slots__ = ("after", "before_forward", "clock", "runtime", "tracing")

    def __init__(
        self,
        runtime: Runtime,
        clock: Clock,
        before_forward: tuple[Stage, ...],
        after: tuple[Finisher, ...],
        tracing: Tracing | None = None,
    ) -> None:
        """`tracing`: decides which calls are traced; a traced call's stages are timed."""
        self.runtime = runtime
        self.clock = clock
        self.before_forward = before_forward
        self.after = after
        self.tracing = tracing

    async def run(self, call: Call, exchange: Exchange) -> None:
        """Walks the call through every stage, forwards it if none refused it, and finishes
        it exactly once, on every path."""
        if self.tracing is not None:
            self.tracing.begin(call)
        spans = call.spans
        clock = self.clock
        try:
            try:
                # A call the adapter could not describe arrives already refused.
                if call.refusal is None:
                    for stage in self.before_forward:
                        if spans is None:
                            await stage(call, exchange)
                        else:
                            # [stage, started, ended]: ended stays None if the stage raised.
                            timing = [type(stage).__name__, clock.monotonic(), None]
                            spans.append(timing)
                            await stage(call, exchange)
                            timing[2] = clock.monotonic()
                        if call.refusal is not None:
                            break
                    else:
                        call.forwarded = True
                        if spans is None:
                            await exchange.forward(call)
                        else:
                            timing = ["forward", clock.monotonic(), None]
                            spans.append(timing)
                            await exchange.forward(call)
                            timing[2] = clock.monotonic()
            except Refusal as refusal:
                call.refusal = refusal
            except asyncio.CancelledError:
                call.error = call.error or "cancelled"
                raise
            except Exception:
                log.exception("bug while handling call %s", call.id)
                call.refusal = InternalError("internal error; the call was not completed")
            if call.refusal is not None and not exchange.responded:
                await exchange.refuse(call)
            if spans is not None:
                answered = clock.monotonic()
                spans.append(["answered", answered, answered])  # the SERVER span ends here
        finally:
            for finish in self.after:
                await finish(call)


def start_call(
    action: Action,
    upstream: str,
    *,
    started: float,
    now: float,
    bearer: str | None,
    declared_task: str | None,
    refusal: Refusal | None,
    declared_parent: str | None = None,
    traceparent: str | None = None,
    tracestate: str | None = None,
    trace_steps: list[Any] | None = None,
) -> Call:
    """A call as a protocol shell hands it to `Pipeline.run` (`refusal`: it could not be
    described; `started` and `now` from the pipeline's clock). One read of the OS's randomness
    gives the trace, span and decision ids; the caller's trace is continued when it sent one.
    `declared_parent`: the orchestrator's `X-Agentproxy-Parent-Task`, validated.
    `trace_steps`: explain's collecting tracer (decide() appends to it)."""
    ids = _IDS.take()
    call = Call(
        id=ids[48:],
        action=action,
        upstream=upstream,
        started=started,
        now=now,
        trace=parse_traceparent(traceparent, tracestate, ids[:32], ids[32:48]),
        bearer=bearer,
        declared_task=declared_task,
        declared_parent=declared_parent,
    )
    call.refusal = refusal
    call.trace_steps = trace_steps
    return call


class _RandomIds:
    """36 bytes of the OS's randomness per call (trace, span and decision ids), read 256
    calls' worth at a time: a system call per call was a measurable share of the cost."""

    CALLS = 256

    def __init__(self) -> None:
        self._hex = ""
        self._at = 0
        # A forked child must never hand out the ids its parent already holds.
        os.register_at_fork(after_in_child=self._forget)

    def take(self) -> str:
        if self._at >= len(self._hex):
            self._hex = os.urandom(36 * self.CALLS).hex()
            self._at = 0
        start = self._at
        self._at = start + 72
        return self._hex[start : start + 72]

    def _forget(self) -> None:
        self._hex, self._at = "", 0


_IDS = _RandomIds()
