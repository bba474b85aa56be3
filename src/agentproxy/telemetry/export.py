"""A bounded queue in front of an OTLP exporter, drained by one thread: a call never waits
for the collector.

The SDK's BatchSpanProcessor also bounds its queue, but drops silently past it (a log line,
no count); here every span lost, to a full queue or to a failed export, is handed to
`on_drop`, which counts it in `agentproxy_telemetry_dropped_total`. Imported only when
tracing is on (it imports the OpenTelemetry SDK).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

log = logging.getLogger("agentproxy.telemetry")


class SpanQueue:
    """At most `max_queue_size` spans wait; the thread sends them `max_batch` at a time, at
    least every `interval` seconds."""

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue_size: int,
        on_drop: Callable[[int], None],
        max_batch: int = 512,
        interval: float = 1.0,
    ) -> None:
        self._exporter = exporter
        self._max = max_queue_size
        self._on_drop = on_drop
        self._batch = max_batch
        self._interval = interval
        self._spans: deque[ReadableSpan] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="agentproxy-otlp", daemon=True)
        self._thread.start()

    def put(self, spans: Sequence[ReadableSpan]) -> None:
        """Queues a call's spans, all or none; never blocks beyond a short lock."""
        with self._wake:
            if self._closing or len(self._spans) + len(spans) > self._max:
                dropped = len(spans)
            else:
                dropped = 0
                self._spans.extend(spans)
                if len(self._spans) >= self._batch:
                    self._wake.notify()
        if dropped:
            self._on_drop(dropped)

    def _run(self) -> None:
        while True:
            with self._wake:
                if not self._closing and len(self._spans) < self._batch:
                    self._wake.wait(self._interval)
                batch = [self._spans.popleft() for _ in range(min(self._batch, len(self._spans)))]
                closing = self._closing and not self._spans
            if batch:
                self._send(batch)
            if closing:
                return

    def _send(self, batch: list[ReadableSpan]) -> None:
        try:
            result = self._exporter.export(batch)
        except Exception:
            log.exception("OTLP export failed")
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self._on_drop(len(batch))

    def close(self, timeout: float = 5.0) -> None:
        """Sends what is queued (for up to `timeout` seconds), then stops the exporter."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)
        self._exporter.shutdown()
