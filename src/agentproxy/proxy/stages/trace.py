"""trace: a traced call's spans, queued for export once its answer is complete."""

from __future__ import annotations

import logging
from typing import Any

import orjson

from agentproxy.audit.chain import redact
from agentproxy.clock import Clock
from agentproxy.config.model import TelemetrySettings
from agentproxy.core import Call
from agentproxy.telemetry import Tracing
from agentproxy.telemetry.messages import bounded, input_attributes

log = logging.getLogger("agentproxy.trace")


class Trace:
    """Runs after record, on every path; never raises, never waits for the collector.

    With `capture_messages`, an LLM call's messages and answer go on its span after the audit
    trail's redaction (`audit.redact` paths under `args.`, keyed HMACs with its key), so a
    span never shows what the trail would not."""

    __slots__ = ("_capture", "_clock", "_key", "_limit", "_redact", "_tracing")

    def __init__(
        self,
        tracing: Tracing,
        clock: Clock,
        settings: TelemetrySettings | None = None,
        *,
        redact_paths: tuple[str, ...] = (),
        hmac_key: bytes | None = None,
    ) -> None:
        self._tracing = tracing
        self._clock = clock
        settings = settings or TelemetrySettings()
        self._capture = settings.capture_messages
        self._limit = settings.max_message_bytes
        self._redact = redact_paths
        self._key = hmac_key

    async def __call__(self, call: Call) -> None:
        try:
            captured = None
            if self._capture and call.action.protocol == "llm" and call.spans is not None:
                captured = self._captured(call)
            self._tracing.end(call, self._clock.monotonic(), captured)
        except Exception:
            log.exception("failed to trace call %s", call.id)

    def _captured(self, call: Call) -> dict[str, str]:
        record: dict[str, Any] = {"args": call.action.args}
        if self._redact:
            record = redact(record, self._redact, self._key)
        attrs = input_attributes(record["args"], self._limit)
        if call.completion is not None:
            message = [
                {"role": "assistant", "parts": [{"type": "text", "content": call.completion}]}
            ]
            attrs["gen_ai.output.messages"] = bounded(orjson.dumps(message).decode(), self._limit)
        return attrs
