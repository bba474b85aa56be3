"""A test LLM provider on a real aiohttp server: the OpenAI-compatible and Anthropic wire formats.

It speaks them well enough for the official `openai` and `anthropic` clients, JSON and
streamed: `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/responses`
(OpenAI) and `/v1/messages` (Anthropic). Token counts are whatever the test put in
`LlmUpstream.usage` for the requested model (else `default_usage`), so a test knows the exact
cost to expect. Every request is recorded in `received` before it is answered.

`Usage` is in billing terms and each wire format reports it its own way:

- OpenAI chat/completions: `prompt_tokens = input + cached_input` (cached tokens are a subset of
  the prompt there), `prompt_tokens_details.cached_tokens = cached_input`,
  `completion_tokens = output`.
- OpenAI responses: `input_tokens = input + cached_input`, `input_tokens_details.cached_tokens =
  cached_input`, `output_tokens = output`.
- OpenAI embeddings: `prompt_tokens = total_tokens = input + cached_input`.
- Anthropic messages: `input_tokens = input` (cache reads are counted apart),
  `cache_read_input_tokens = cached_input`, `output_tokens = output`. Streamed, `message_start`
  reports `output_tokens: 1` (as Anthropic does) and `message_delta` the cumulative total.

Streams follow the providers: chat and legacy completions send usage only when the request
asks with `stream_options.include_usage: true` (a final chunk with `choices: []`, then
`data: [DONE]`); responses carry it in `response.completed`; messages in `message_start` and
`message_delta`.

A model listed in `slow` is served as a big stream whose closing events (finish, usage and
terminator) are held back until the test sets `SlowStream.release`: a client that has seen
the first delta while `release` is unset proves nothing buffered the stream.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDictProxy

from tests.conftest import start_app

CREATED = 1_700_000_000  # a fixed timestamp keeps replies byte-for-byte reproducible
REPLY_TEXT = "Hello from the test upstream."


@dataclass(frozen=True, slots=True)
class Usage:
    """What one call consumed. `input` excludes cached input; see the module doc for the wire."""

    input: int = 11
    output: int = 7
    cached_input: int = 0

    def __post_init__(self) -> None:
        if min(self.input, self.output, self.cached_input) < 0:
            raise ValueError(f"token counts cannot be negative: {self}")

    @property
    def openai_prompt_tokens(self) -> int:
        return self.input + self.cached_input


@dataclass(slots=True)
class SlowStream:
    """A stream of `events` content deltas of `total_bytes` in all, whose closing events wait
    for `release`. `holding` is set once every delta has been written and the server is
    waiting; `finished` once the last event has been written.

    A test reads the first event, checks `finished` is unset, then reads on (a megabyte need
    not fit in the socket buffers, so awaiting `holding` before reading can deadlock) and sets
    `release` to get the rest."""

    events: int = 256
    total_bytes: int = 1 << 20
    release: asyncio.Event = field(default_factory=asyncio.Event)
    holding: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        if self.events < 1 or self.total_bytes < self.events:
            raise ValueError("a slow stream needs at least one event of at least one byte")

    def deltas(self) -> list[str]:
        size, extra = divmod(self.total_bytes, self.events)
        return ["x" * (size + (i < extra)) for i in range(self.events)]


@dataclass(frozen=True, slots=True)
class Received:
    """One request as it reached the upstream. `headers` match case-insensitively; `body` is the
    parsed JSON object (`{}` when the body was not one; `raw` has the bytes either way)."""

    method: str
    path: str
    headers: CIMultiDictProxy[str]
    raw: bytes
    body: dict[str, Any]


@dataclass
class LlmUpstream:
    """The server's state, owned by the test. `url` has no `/v1`: the openai client wants
    `openai_base_url`, the anthropic client `url` itself."""

    url: str = ""
    usage: dict[str, Usage] = field(default_factory=dict)
    default_usage: Usage = field(default_factory=Usage)
    # The model name replies report, when it differs from the requested one (OpenAI answers a
    # request for "gpt-4o" with a dated snapshot such as "gpt-4o-2024-08-06").
    served_model: dict[str, str] = field(default_factory=dict)
    slow: dict[str, SlowStream] = field(default_factory=dict)
    # When set, chat completions for any other model answer 404 model_not_found, as OpenAI.
    models: set[str] | None = None
    # When set, a stream's bytes are written in pieces of this size regardless of event
    # boundaries, so an event (the usage one included) straddles reads downstream.
    write_size: int | None = None
    received: list[Received] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    def usage_for(self, model: str) -> Usage:
        return self.usage.get(model, self.default_usage)

    def bodies(self, path: str) -> list[dict[str, Any]]:
        """The JSON bodies received on `path` (e.g. "/v1/chat/completions"), oldest first."""
        return [r.body for r in self.received if r.path == path]

    def next_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"


# -- wire helpers ---------------------------------------------------------------------------


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    """One Server-Sent Event (WHATWG HTML §9.2): optional `event:` line, one `data:` line."""
    payload = data if isinstance(data, str) else orjson.dumps(data).decode()
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {payload}\n\n".encode()


def split_words(text: str) -> list[str]:
    words = text.split(" ")
    return [words[0], *(" " + w for w in words[1:])]


def openai_error(status: int, message: str, param: str | None = None) -> web.Response:
    return json_reply(
        {"error": {"message": message, "type": "invalid_request_error", "param": param}}, status
    )


def anthropic_error(status: int, message: str) -> web.Response:
    return json_reply(
        {"type": "error", "error": {"type": "invalid_request_error", "message": message}}, status
    )


def json_reply(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


# -- the server -------------------------------------------------------------------------------


class LlmServer:
    """The request handlers; all state lives in the `LlmUpstream` the test holds."""

    def __init__(self, state: LlmUpstream) -> None:
        self.state = state

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/messages", self.messages)
        return app

    async def receive(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = None
        body = parsed if isinstance(parsed, dict) else {}
        self.state.received.append(
            Received(request.method, request.path, request.headers, raw, body)
        )
        return body

    async def stream(
        self,
        request: web.Request,
        model: str,
        head: list[bytes],
        tail: list[bytes],
    ) -> web.StreamResponse:
        """Write `head`, then (for a slow model) wait for the test's release, then `tail`."""
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        await response.prepare(request)
        slow = self.state.slow.get(model)
        await self.write(response, head)
        if slow is not None:
            slow.holding.set()
            await slow.release.wait()
        await self.write(response, tail)
        await response.write_eof()
        if slow is not None:
            slow.finished.set()
        return response

    async def write(self, response: web.StreamResponse, frames: list[bytes]) -> None:
        size = self.state.write_size
        for frame in frames:
            if size is None:
                await response.write(frame)
                continue
            for start in range(0, len(frame), size):
                await response.write(frame[start : start + size])
                await asyncio.sleep(0)  # let each piece leave as its own segment

    def deltas(self, model: str) -> list[str]:
        slow = self.state.slow.get(model)
        return slow.deltas() if slow is not None else split_words(REPLY_TEXT)

    # -- OpenAI: chat completions and legacy completions --

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self.receive(request)
        model = body.get("model")
        if not isinstance(model, str):
            return openai_error(400, "you must provide a model parameter", "model")
        if self.state.models is not None and model not in self.state.models:
            return openai_error(404, f"The model `{model}` does not exist", "model")
        usage = self.state.usage_for(model)
        served = self.state.served_model.get(model, model)
        cid = self.state.next_id("chatcmpl-test-")
        if body.get("stream") is not True:
            return json_reply(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": CREATED,
                    "model": served,
                    "system_fingerprint": "fp_test",
                    "service_tier": "default",
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": REPLY_TEXT,
                                "refusal": None,
                                "annotations": [],
                            },
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": chat_usage(usage),
                }
            )
        include_usage = wants_usage(body)

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            data: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": served,
                "system_fingerprint": "fp_test",
                "service_tier": "default",
                "choices": choices,
            }
            if include_usage:
                data["usage"] = None
            data.update(extra)
            return sse(data)

        def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        head = [chunk([choice({"role": "assistant", "content": "", "refusal": None})])]
        head += [chunk([choice({"content": text})]) for text in self.deltas(model)]
        tail = [chunk([choice({}, "stop")])]
        if include_usage:
            tail.append(chunk([], usage=chat_usage(usage)))
        tail.append(sse("[DONE]"))
        return await self.stream(request, model, head, tail)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self.receive(request)
        model = body.get("model")
        if not isinstance(model, str):
            return openai_error(400, "you must provide a model parameter", "model")
        usage = self.state.usage_for(model)
        served = self.state.served_model.get(model, model)
        cid = self.state.next_id("cmpl-test-")

        def completion(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            data: dict[str, Any] = {
                "id": cid,
                "object": "text_completion",
                "created": CREATED,
                "model": served,
                "system_fingerprint": "fp_test",
                "choices": choices,
            }
            data.update(extra)
            return data

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

        totals = {
            "prompt_tokens": usage.openai_prompt_tokens,
            "completion_tokens": usage.output,
            "total_tokens": usage.openai_prompt_tokens + usage.output,
        }
        if body.get("stream") is not True:
            return json_reply(completion([choice(REPLY_TEXT, "stop")], usage=totals))
        include_usage = wants_usage(body)
        extra: dict[str, Any] = {"usage": None} if include_usage else {}
        head = [sse(completion([choice(t, None)], **extra)) for t in self.deltas(model)]
        tail = [sse(completion([choice("", "stop")], **extra))]
        if include_usage:
            tail.append(sse(completion([], usage=totals)))
        tail.append(sse("[DONE]"))
        return await self.stream(request, model, head, tail)

    # -- OpenAI: embeddings --

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self.receive(request)
        model = body.get("model")
        if not isinstance(model, str):
            return openai_error(400, "you must provide a model parameter", "model")
        inputs = body.get("input")
        if isinstance(inputs, str) or (
            isinstance(inputs, list) and inputs and isinstance(inputs[0], int)
        ):
            count = 1
        elif isinstance(inputs, list) and inputs:
            count = len(inputs)
        else:
            return openai_error(400, "input must be a string or a non-empty array", "input")
        dimensions = body.get("dimensions")
        width = dimensions if isinstance(dimensions, int) and dimensions > 0 else 8
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index in range(count):
            vector = [round((index + 1) * 0.125 + i * 0.0625, 6) for i in range(width)]
            embedding: list[float] | str = vector
            if as_base64:
                packed = struct.pack(f"<{width}f", *vector)
                embedding = base64.b64encode(packed).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        prompt = self.state.usage_for(model).openai_prompt_tokens
        return json_reply(
            {
                "object": "list",
                "data": data,
                "model": self.state.served_model.get(model, model),
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
            }
        )

    # -- OpenAI: responses --

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await self.receive(request)
        model = body.get("model")
        if not isinstance(model, str):
            return openai_error(400, "you must provide a model parameter", "model")
        usage = self.state.usage_for(model)
        rid = self.state.next_id("resp_test_")
        mid = self.state.next_id("msg_test_")
        served = self.state.served_model.get(model, model)
        deltas = self.deltas(model)
        text = "".join(deltas)
        part_done = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item_done = {
            "id": mid,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [part_done],
        }
        done = response_object(rid, served, body, "completed", [item_done], usage)
        if body.get("stream") is not True:
            return json_reply(done)
        seq = itertools.count()

        def event(kind: str, **fields: Any) -> bytes:
            return sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

        where = {"item_id": mid, "output_index": 0, "content_index": 0}
        in_progress = response_object(rid, served, body, "in_progress", [], None)
        head = [
            event("response.created", response=in_progress),
            event("response.in_progress", response=in_progress),
            event(
                "response.output_item.added",
                output_index=0,
                item={**item_done, "status": "in_progress", "content": []},
            ),
            event(
                "response.content_part.added",
                **where,
                part={**part_done, "text": ""},
            ),
        ]
        head += [event("response.output_text.delta", **where, delta=d, logprobs=[]) for d in deltas]
        tail = [
            event("response.output_text.done", **where, text=text, logprobs=[]),
            event("response.content_part.done", **where, part=part_done),
            event("response.output_item.done", output_index=0, item=item_done),
            event("response.completed", response=done),
        ]
        return await self.stream(request, model, head, tail)

    # -- Anthropic: messages --

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await self.receive(request)
        model = body.get("model")
        if not isinstance(model, str):
            return anthropic_error(400, "model: Field required")
        if not isinstance(body.get("max_tokens"), int):
            return anthropic_error(400, "max_tokens: Field required")
        usage = self.state.usage_for(model)
        mid = self.state.next_id("msg_test_")
        served = self.state.served_model.get(model, model)

        def message(content: list[dict[str, Any]], stop: str | None, output: int) -> dict[str, Any]:
            return {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": served,
                "content": content,
                "stop_reason": stop,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": usage.input,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": usage.cached_input,
                    "output_tokens": output,
                    "service_tier": "standard",
                },
            }

        if body.get("stream") is not True:
            text_block = {"type": "text", "text": REPLY_TEXT}
            return json_reply(message([text_block], "end_turn", usage.output))

        def event(kind: str, **fields: Any) -> bytes:
            return sse({"type": kind, **fields}, event=kind)

        head = [
            # Anthropic reports a first output token in message_start; message_delta then
            # carries the cumulative count, which replaces it (it is not added to it).
            event("message_start", message=message([], None, min(1, usage.output))),
            event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
            event("ping"),
        ]
        head += [
            event("content_block_delta", index=0, delta={"type": "text_delta", "text": t})
            for t in self.deltas(model)
        ]
        tail = [
            event("content_block_stop", index=0),
            event(
                "message_delta",
                delta={"stop_reason": "end_turn", "stop_sequence": None},
                usage={"output_tokens": usage.output},
            ),
            event("message_stop"),
        ]
        return await self.stream(request, model, head, tail)


def wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def chat_usage(usage: Usage) -> dict[str, Any]:
    prompt = usage.openai_prompt_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": usage.output,
        "total_tokens": prompt + usage.output,
        "prompt_tokens_details": {"cached_tokens": usage.cached_input, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def response_object(
    rid: str,
    model: str,
    request: dict[str, Any],
    status: str,
    output: list[dict[str, Any]],
    usage: Usage | None,
) -> dict[str, Any]:
    """A `Response` of the OpenAI responses API, with the fields its clients expect."""
    return {
        "id": rid,
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "metadata": {},
        "user": None,
        "usage": None
        if usage is None
        else {
            "input_tokens": usage.openai_prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_input, "cache_write_tokens": 0},
            "output_tokens": usage.output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.openai_prompt_tokens + usage.output,
        },
    }


@asynccontextmanager
async def serve_llm_upstream() -> AsyncIterator[LlmUpstream]:
    """Run the server on a free loopback port for the length of the block."""
    state = LlmUpstream()
    runner, port = await start_app(LlmServer(state).app())
    state.url = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        # A test that failed before releasing its slow stream must not hang the cleanup.
        for slow in state.slow.values():
            slow.release.set()
        await runner.cleanup()
