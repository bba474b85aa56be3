"""OpenTelemetry traces of the calls the proxy decides (off by default).

`tracing()` reads the `telemetry:` section and the standard `OTEL_*` variables and returns a
`Tracing`, or None when neither names an OTLP endpoint. The SDK and the exporters are
imported only then: a proxy that does not trace never loads them (they cost start-up time).

Sampling is parent-based with a trace-id ratio (`telemetry.sample_ratio`, else
`OTEL_TRACES_SAMPLER_ARG`, else 1): a sampled call keeps its stage timings (`Call.spans`)
and, once answered, becomes spans in a bounded queue that a thread exports; a full queue or a
failed export drops spans and counts them, and never holds a call.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from agentproxy.config.model import OtlpProtocol, TelemetrySettings
from agentproxy.core import Call
from agentproxy.telemetry.sampling import bound, ratio_from_env, sampled

__all__ = ["Exporter", "Tracing", "resolve", "tracing"]


class Exporter:
    """Where spans go, resolved from the config and the environment."""

    __slots__ = ("endpoint", "protocol", "ratio")

    def __init__(self, endpoint: str | None, protocol: OtlpProtocol, ratio: float) -> None:
        self.endpoint = endpoint  # None: the exporter reads OTEL_EXPORTER_OTLP_*ENDPOINT itself
        self.protocol = protocol
        self.ratio = ratio

    def __repr__(self) -> str:
        return f"Exporter({self.endpoint!r}, {self.protocol!r}, {self.ratio!r})"


def resolve(
    settings: TelemetrySettings, environ: Mapping[str, str] = os.environ
) -> Exporter | None:
    """The exporter `settings` and `environ` describe, or None: tracing is off (no endpoint in
    either, `OTEL_SDK_DISABLED=true`, or `OTEL_TRACES_EXPORTER=none`)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    endpoint = settings.endpoint
    if endpoint is None and not (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    ):
        return None
    protocol = settings.protocol or (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    )
    if protocol not in ("grpc", "http/protobuf"):
        raise ValueError(f"OTLP protocol {protocol!r} is not supported (grpc or http/protobuf)")
    ratio = settings.sample_ratio
    if ratio is None:
        ratio = ratio_from_env(environ)
    return Exporter(endpoint, protocol, 1.0 if ratio is None else ratio)  # type: ignore[arg-type]


class Tracing:
    """The proxy's tracer: one per process, outliving reloads."""

    __slots__ = ("_bound", "_build", "_queue", "_resource", "exporter")

    def __init__(
        self,
        exporter: Exporter,
        *,
        max_queue_size: int,
        on_drop: Callable[[int], None],
        interval: float = 1.0,
    ) -> None:
        """Raises ImportError when the `otel` extra is not installed."""
        try:
            from agentproxy.telemetry import otlp, spans
        except ImportError as exc:
            raise ImportError(
                f"tracing needs the otel extra (pip install 'agentproxy[otel]'): {exc}"
            ) from exc

        self.exporter = exporter
        self._bound = bound(exporter.ratio)
        self._resource = spans.resource()
        self._build = spans.call_spans
        self._queue = otlp.queue(
            exporter.endpoint, exporter.protocol, max_queue_size, on_drop, interval
        )

    def begin(self, call: Call) -> None:
        """Decides whether `call` is traced; a trace the proxy starts says so in its flags
        (the upstream's sampler follows them). Its stages are timed if it is, or if it may
        yet be: a call with no `traceparent` header may find its parent in an MCP body."""
        trace = call.trace
        keep = sampled(trace, self._bound)
        if trace.parent_id is None:
            flags = "01" if keep else "00"
            if trace.flags != flags:
                call.trace = replace(trace, flags=flags)
        if keep or trace.parent_id is None:
            call.spans = []

    def end(self, call: Call, ended: float, captured: Mapping[str, str] | None = None) -> None:
        """Queues the spans of a traced call (`ended`: monotonic). Never blocks. Decided
        again: an MCP call may have found its parent in the body (`params._meta`) after
        `begin`; the parent's flag then decides (a call timed by then has its stages).
        `captured`: reasoning capture's attributes, already redacted and bounded."""
        if sampled(call.trace, self._bound):
            self._queue.put(self._build(call, ended, self._resource, captured))

    def close(self, timeout: float = 5.0) -> None:
        self._queue.close(timeout)


def tracing(
    settings: TelemetrySettings,
    on_drop: Callable[[int], None],
    environ: Mapping[str, str] = os.environ,
    **options: Any,
) -> Tracing | None:
    """The process's tracer, or None when tracing is off. Raises ValueError for an
    unsupported protocol, ImportError when the `otel` extra is missing."""
    exporter = resolve(settings, environ)
    if exporter is None:
        return None
    return Tracing(exporter, max_queue_size=settings.max_queue_size, on_drop=on_drop, **options)
