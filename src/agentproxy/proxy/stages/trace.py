"""trace: a traced call's spans, queued for export once its answer is complete."""

from __future__ import annotations

import logging

from agentproxy.clock import Clock
from agentproxy.core import Call
from agentproxy.telemetry import Tracing

log = logging.getLogger("agentproxy.trace")


class Trace:
    """Runs after record, on every path; never raises, never waits for the collector."""

    __slots__ = ("_clock", "_tracing")

    def __init__(self, tracing: Tracing, clock: Clock) -> None:
        self._tracing = tracing
        self._clock = clock

    async def __call__(self, call: Call) -> None:
        try:
            self._tracing.end(call, self._clock.monotonic())
        except Exception:
            log.exception("failed to trace call %s", call.id)
