"""Reasoning capture (opt-in, `telemetry.capture_messages`): what an LLM call asked and
answered, as the GenAI conventions' opt-in attributes (`gen_ai.input.messages`,
`gen_ai.system_instructions`, `gen_ai.output.messages`), each bounded to
`max_message_bytes`. The redaction of the audit trail is applied by the caller before these
are built (the proxy's trace stage); no header is ever read, so never the provider's key.
"""

from __future__ import annotations

from typing import Any

import orjson

TRUNCATED = "…[truncated]"


def bounded(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes (on a character boundary), marked when cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    keep = max(0, limit - len(TRUNCATED.encode()))
    return data[:keep].decode(errors="ignore") + TRUNCATED


def input_attributes(args: Any, limit: int) -> dict[str, str]:
    """The request's messages (OpenAI `messages` or Responses `input`, Anthropic `messages`)
    and system instructions (Anthropic `system`), as JSON text."""
    if not isinstance(args, dict):
        return {}
    attrs: dict[str, str] = {}
    messages = args.get("messages", args.get("input"))
    if messages is not None:
        attrs["gen_ai.input.messages"] = bounded(orjson.dumps(messages).decode(), limit)
    if args.get("system") is not None:
        system = args["system"]
        text = system if isinstance(system, str) else orjson.dumps(system).decode()
        attrs["gen_ai.system_instructions"] = bounded(text, limit)
    return attrs


def output_text(body: bytes, content_type: str) -> str | None:
    """The answer's text: a JSON answer's message content (OpenAI `choices[].message`,
    Responses `output[].content[]`, Anthropic `content[]`), or a stream's deltas joined (OpenAI
    `choices[].delta.content`, Anthropic `content_block_delta`). None when there is none.
    Never raises: a body cut at the capture bound parses as far as it goes."""
    try:
        if "text/event-stream" in content_type:
            return _stream_text(body)
        return _answer_text(orjson.loads(body))
    except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
        return None


def _answer_text(answer: Any) -> str | None:
    if not isinstance(answer, dict):
        return None
    parts: list[str] = []
    for choice in answer.get("choices") or ():
        content = (choice.get("message") or {}).get("content")
        if isinstance(content, str):
            parts.append(content)
    for block in answer.get("content") or ():
        if isinstance(block, dict) and isinstance(block.get("text"), str):
            parts.append(block["text"])
    for item in answer.get("output") or ():
        for block in (item.get("content") or ()) if isinstance(item, dict) else ():
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                parts.append(block["text"])
    return "".join(parts) if parts else None


def _stream_text(body: bytes) -> str | None:
    parts: list[str] = []
    for line in body.splitlines():
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if not data or data == b"[DONE]":
            continue
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue  # the last event, cut at the capture bound
        if not isinstance(event, dict):
            continue
        for choice in event.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if isinstance(content, str):
                parts.append(content)
        delta = event.get("delta")
        kind = event.get("type")
        if kind == "content_block_delta" and isinstance(delta, dict) and "text" in delta:
            parts.append(str(delta["text"]))
        if kind == "response.output_text.delta" and isinstance(delta, str):
            parts.append(delta)
    return "".join(parts) if parts else None
