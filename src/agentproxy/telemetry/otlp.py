"""The OTLP exporters (gRPC and HTTP/protobuf) behind the span queue. Imported only when
tracing is on."""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry.sdk.trace.export import SpanExporter

from agentproxy.config.model import OtlpProtocol
from agentproxy.telemetry.export import SpanQueue


def exporter(endpoint: str | None, protocol: OtlpProtocol) -> SpanExporter:
    """The SDK's exporter for `settings`. A configured endpoint is the collector's base URL,
    as in `OTEL_EXPORTER_OTLP_ENDPOINT` (HTTP: `/v1/traces` is appended); without one the
    exporter reads the `OTEL_EXPORTER_OTLP_*` variables itself (headers, timeouts, TLS too)."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        if endpoint is None:
            return OTLPSpanExporter()
        return OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    if endpoint is None:
        return HttpExporter()
    return HttpExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")


def queue(
    endpoint: str | None,
    protocol: OtlpProtocol,
    max_queue_size: int,
    on_drop: Callable[[int], None],
    interval: float,
) -> SpanQueue:
    return SpanQueue(
        exporter(endpoint, protocol),
        max_queue_size=max_queue_size,
        on_drop=on_drop,
        interval=interval,
    )
