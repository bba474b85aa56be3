"""Which calls are traced: parent-based, then a ratio of the trace ids (no OpenTelemetry import).

The ratio test is the SDK's `TraceIdRatioBased`: the trace id's low 64 bits below
`ratio * 2**64`, so every process (and every SDK) sampling at the same ratio keeps the same
traces. A caller's `traceparent` decides for its trace (W3C Trace Context §3.2.2.5, the
sampled flag): a proxy must not cut a trace its caller keeps, nor keep one its caller dropped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from agentproxy.core import TraceContext

_SPAN = 2**64


def bound(ratio: float) -> int:
    """The trace-id bound for `ratio` (0: nothing, 1: everything)."""
    return round(max(0.0, min(1.0, ratio)) * _SPAN)


def sampled(trace: TraceContext, bound: int) -> bool:
    """True when the call's spans are recorded and exported."""
    if trace.parent_id is not None:
        return trace.sampled
    return int(trace.trace_id[16:], 16) < bound


def ratio_from_env(environ: Mapping[str, str] = os.environ) -> float | None:
    """The ratio `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` name, or None when they
    name none (the SDK's variables; every sampler is read parent-based here)."""
    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler in ("always_off", "parentbased_always_off"):
        return 0.0
    if sampler in ("always_on", "parentbased_always_on"):
        return 1.0
    if sampler in ("traceidratio", "parentbased_traceidratio"):
        try:
            return max(0.0, min(1.0, float(environ.get("OTEL_TRACES_SAMPLER_ARG", "1"))))
        except ValueError:
            return 1.0
    return None
