"""The LLM adapter: bytes in, values out; no sockets."""

from __future__ import annotations

import gzip
from typing import Any

import orjson
import pytest

from agentproxy.errors import BadRequest, PayloadTooLarge
from agentproxy.protocols.llm import (
    LlmRequest,
    Usage,
    UsageTap,
    describe,
    estimate_input_tokens,
)

JSON = {"content-type": "application/json"}
MAX = 1 << 20
SSE = "text/event-stream"


def post(path: str, body: Any, headers: dict[str, str] | None = None, **kw: Any) -> LlmRequest:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    merged = {**JSON, **(headers or {})}
    return describe("POST", path, merged, raw, max_bytes=kw.get("max_bytes", MAX))


def refused(path: str, body: Any, headers: dict[str, str] | None = None) -> str:
    with pytest.raises(BadRequest) as info:
        post(path, body, headers)
    return info.value.detail


def chat(**members: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **members}


# --- describe --------------------------------------------------------------------------------

ENDPOINTS = [
    ("/v1/chat/completions", "chat", "openai"),
    ("/v1/completions", "completions", "openai"),
    ("/v1/embeddings", "embeddings", "openai"),
    ("/v1/responses", "responses", "openai"),
    ("/v1/messages", "messages", "anthropic"),
]


@pytest.mark.parametrize(("path", "operation", "provider"), ENDPOINTS)
@pytest.mark.parametrize("prefix", ["", "/openai", "/gateway/anthropic"])
def test_each_endpoint_is_named_by_operation_and_model(
    path: str, operation: str, provider: str, prefix: str
) -> None:
    raw = b'{"model": "m-1",  "max_tokens": 10, "input": "x"}'
    request = post(prefix + path, raw)
    assert request.action.protocol == "llm"
    assert request.action.operation == operation
    assert request.action.target == "m-1"
    assert request.action.name == f"llm:{operation}/m-1"
    assert request.action.args == {"model": "m-1", "max_tokens": 10, "input": "x"}
    assert (request.provider, request.operation, request.model) == (provider, operation, "m-1")
    assert request.body == raw  # unchanged: forwarded byte for byte
    assert (request.stream, request.strip_usage, request.max_tokens) == (False, False, 10)


def test_a_trailing_slash_does_not_escape_metering() -> None:
    assert post("/v1/chat/completions/", chat()).operation == "chat"


def test_a_model_with_slashes_stays_in_the_name() -> None:
    request = post("/v1/chat/completions", chat(model="meta-llama/Llama-3.1-8B"))
    assert request.action.name == "llm:chat/meta-llama/Llama-3.1-8B"


@pytest.mark.parametrize(
    ("method", "path", "name"),
    [
        ("GET", "/v1/models", "llm:other/GET /v1/models"),
        ("GET", "/v1/chat/completions", "llm:other/GET /v1/chat/completions"),
        ("POST", "/v1/messages/count_tokens", "llm:other/POST /v1/messages/count_tokens"),
        ("POST", "/v1/messages/batches", "llm:other/POST /v1/messages/batches"),
        ("POST", "/v1/responses/resp_1/cancel", "llm:other/POST /v1/responses/resp_1/cancel"),
        ("POST", "/v1/chat/completionsx", "llm:other/POST /v1/chat/completionsx"),
        ("DELETE", "/v1/files/f-1", "llm:other/DELETE /v1/files/f-1"),
    ],
)
def test_other_requests_are_named_by_method_and_path_and_not_read(
    method: str, path: str, name: str
) -> None:
    body = b"\x1f\x8bnot json at all"
    request = describe(method, path, {"content-type": "multipart/form-data"}, body, max_bytes=1)
    assert request.action.name == name
    assert (request.action.operation, request.action.target, request.action.args) == (
        "other",
        path,
        {},
    )
    assert (request.provider, request.operation, request.model) == ("other", "other", None)
    assert (request.stream, request.max_tokens, request.strip_usage) == (False, None, False)
    assert request.body == body
    assert estimate_input_tokens(request) == 0


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GE T", "/v1/models"),
        ("", "/v1/models"),
        ("POST", "v1/chat/completions"),
        ("POST", "/v1/chat/completions?x=1"),
        ("POST", "/v1/chat completions"),
        ("GET", "/v1/mod\x00els"),
        ("GET", "/" + "a" * 9000),
    ],
)
def test_a_method_or_path_that_is_not_normalized_is_refused(method: str, path: str) -> None:
    with pytest.raises(BadRequest):
        describe(method, path, JSON, orjson.dumps(chat()), max_bytes=MAX)


@pytest.mark.parametrize(
    ("members", "stream"),
    [({}, False), ({"stream": False}, False), ({"stream": None}, False), ({"stream": True}, True)],
)
def test_stream_flag(members: dict[str, Any], stream: bool) -> None:
    assert post("/v1/messages", chat(max_tokens=5, **members)).stream is stream


def test_a_stream_flag_that_is_not_a_boolean_is_refused() -> None:
    assert "stream" in refused("/v1/chat/completions", chat(stream="true"))


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/proxy/v1/completions"])
def test_a_stream_without_usage_is_made_to_ask_for_it(path: str) -> None:
    request = post(path, chat(stream=True, temperature=0.5))
    forwarded = orjson.loads(request.body)
    assert forwarded == chat(stream=True, temperature=0.5, stream_options={"include_usage": True})
    assert request.strip_usage and request.stream
    assert request.action.args == forwarded  # policy sees what the upstream reads


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (None, {"include_usage": True}),
        ({}, {"include_usage": True}),
        ({"include_obfuscation": False}, {"include_obfuscation": False, "include_usage": True}),
        ({"include_usage": False}, {"include_usage": True}),
        ({"include_usage": None, "x": 1}, {"include_usage": True, "x": 1}),
    ],
)
def test_injection_keeps_other_stream_options(
    options: dict[str, Any] | None, expected: dict[str, Any]
) -> None:
    request = post("/v1/chat/completions", chat(stream=True, stream_options=options))
    assert orjson.loads(request.body)["stream_options"] == expected
    assert request.strip_usage


def test_a_stream_that_asks_for_usage_is_forwarded_byte_identical() -> None:
    raw = (
        b'{ "model" : "gpt-4o", "stream": true,\n "stream_options": {"include_usage": true},'
        b' "messages": [], "temperature": 1.50 }'
    )
    request = post("/v1/chat/completions", raw)
    assert request.body == raw
    assert request.stream and not request.strip_usage


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages", "/v1/embeddings"])
def test_streams_that_always_carry_usage_are_not_changed(path: str) -> None:
    raw = orjson.dumps(chat(stream=True, max_tokens=100))
    request = post(path, raw)
    assert request.body == raw and not request.strip_usage


def test_a_request_that_does_not_stream_is_not_changed() -> None:
    raw = orjson.dumps(chat(stream=False))
    assert post("/v1/chat/completions", raw).body == raw


@pytest.mark.parametrize(
    ("options", "detail"),
    [
        ("yes", '"stream_options" must be an object'),
        ([], '"stream_options" must be an object'),
        ({"include_usage": "yes"}, "include_usage"),
        ({"include_usage": 1}, "include_usage"),
    ],
)
def test_unreadable_stream_options_are_refused(options: Any, detail: str) -> None:
    assert detail in refused("/v1/chat/completions", chat(stream=True, stream_options=options))


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        ({}, None),
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 200}, 200),
        ({"max_output_tokens": 300}, 300),
        ({"max_tokens": 50, "max_completion_tokens": 70}, 70),
        ({"max_tokens": None}, None),
        ({"max_tokens": 0}, 0),
    ],
)
def test_max_tokens_fields(members: dict[str, Any], expected: int | None) -> None:
    assert post("/v1/chat/completions", chat(**members)).max_tokens == expected


@pytest.mark.parametrize("value", [-1, 1.5, "100", True, [1]])
def test_a_max_tokens_that_is_not_a_count_is_refused(value: Any) -> None:
    assert "max_completion_tokens" in refused(
        "/v1/chat/completions", chat(max_completion_tokens=value)
    )


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"model": None},
        {"model": ""},
        {"model": 4},
        {"model": ["gpt-4o"]},
        {"model": "m" * 257},
        {"model": "gpt-4o\n"},
        {"model": "gpt\u202e4o"},
    ],
)
def test_a_bad_model_is_refused(body: dict[str, Any]) -> None:
    assert '"model"' in refused("/v1/chat/completions", body)


def test_a_model_of_256_characters_is_accepted() -> None:
    assert post("/v1/embeddings", {"model": "m" * 256, "input": "x"}).model == "m" * 256


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "a", "model": "b"}',
        b'{"model": "a", "temperature": NaN}',
        b'{"model": "a", "temperature": 1e400}',
        b'{"model": "a", "n": 99999999999999999999999}',
        b'{"model": "a", "x": "\\ud800"}',
        b'{"model": "a"} trailing',
        b'{"model": "a", "x": "\xff"}',
        b"\xef\xbb\xbf{}",
        b"",
        b"[" * 100 + b"]" * 100,
    ],
)
def test_json_that_reads_two_ways_is_refused(raw: bytes) -> None:
    assert refused("/v1/chat/completions", raw).startswith("parse error")


@pytest.mark.parametrize("raw", [b"[]", b'"gpt-4o"', b"null"])
def test_a_body_that_is_not_an_object_is_refused(raw: bytes) -> None:
    assert "JSON object" in refused("/v1/messages", raw)


@pytest.mark.parametrize(
    "headers",
    [
        {"content-type": "text/plain"},
        {"content-type": "application/json; charset=latin-1"},
        {"content-type": "application/json", "content-encoding": "br"},
        {"content-type": "application/json", "content-encoding": "gzip"},  # not gzip
    ],
)
def test_content_headers_are_checked(headers: dict[str, str]) -> None:
    with pytest.raises(BadRequest):
        describe("POST", "/v1/chat/completions", headers, orjson.dumps(chat()), max_bytes=MAX)


def test_a_missing_content_type_is_refused() -> None:
    with pytest.raises(BadRequest):
        describe("POST", "/v1/chat/completions", {}, orjson.dumps(chat()), max_bytes=MAX)


def test_a_gzip_body_is_forwarded_decoded() -> None:
    raw = orjson.dumps(chat(max_tokens=3))
    request = post("/v1/chat/completions", gzip.compress(raw), {"content-encoding": "gzip"})
    assert request.body == raw and request.max_tokens == 3


def test_a_gzip_bomb_stops_at_the_cap() -> None:
    bomb = gzip.compress(b'{"model": "a", "x": "' + b"a" * 10_000_000 + b'"}')
    with pytest.raises(PayloadTooLarge):
        post("/v1/chat/completions", bomb, {"content-encoding": "gzip"})


def test_a_body_over_the_cap_is_refused() -> None:
    with pytest.raises(PayloadTooLarge):
        post("/v1/chat/completions", chat(), max_bytes=10)


def test_llm_request_invariants() -> None:
    request = post("/v1/chat/completions", chat())
    with pytest.raises(ValueError, match="only an `other`"):
        LlmRequest(request.action, "openai", "chat", None, False, None, b"", False)
    with pytest.raises(ValueError, match="strip_usage"):
        LlmRequest(request.action, "openai", "chat", "gpt-4o-mini", False, None, b"", True)


def test_estimate_input_tokens_over_counts_the_body() -> None:
    request = post("/v1/chat/completions", b'{"model":"a"}' + b" " * 87)  # 100 bytes
    assert estimate_input_tokens(request) == 34


# --- upstream answers ------------------------------------------------------------------------


def sse(*events: dict[str, Any] | str, eol: str = "\n", named: bool = False) -> bytes:
    out = []
    for event in events:
        if isinstance(event, str):
            out.append(f"data: {event}{eol}{eol}")
            continue
        data = orjson.dumps(event).decode()
        head = f"event: {event['type']}{eol}" if named else ""
        out.append(f"{head}data: {data}{eol}{eol}")
    return "".join(out).encode()


def chunk(content: str | None, *, usage: Any = None, finish: str | None = None) -> dict[str, Any]:
    choices = (
        []
        if content is None and finish is None
        else [
            {"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}
        ]
    )
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_1",
        "choices": choices,
        "usage": usage,
    }


OPENAI_USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 42,
    "total_tokens": 1242,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 10},
}
OPENAI_EXPECTED = Usage(176, 42, 1024, "gpt-4o-mini-2024-07-18")

CHAT_HEAD = sse(chunk("Hel"), chunk("lo"), chunk(None, finish="stop"))
CHAT_USAGE = sse(chunk(None, usage=OPENAI_USAGE))
CHAT_STREAM = CHAT_HEAD + CHAT_USAGE + sse("[DONE]")


def streamed_chat(*, asks: bool, path: str = "/v1/chat/completions") -> LlmRequest:
    options = {"stream_options": {"include_usage": True}} if asks else {}
    return post(path, chat(stream=True, **options))


def run(tap: UsageTap, *chunks: bytes) -> bytes:
    return b"".join(tap.feed(piece) for piece in chunks) + tap.finish()


def tap_all(request: LlmRequest, stream: bytes, content_type: str = SSE) -> tuple[bytes, Any]:
    tap = UsageTap(request, content_type)
    return run(tap, stream), tap.usage


def test_openai_chat_stream_when_the_client_asked_for_usage() -> None:
    out, usage = tap_all(streamed_chat(asks=True), CHAT_STREAM)
    assert out == CHAT_STREAM
    assert usage == OPENAI_EXPECTED


def test_openai_chat_stream_drops_the_usage_chunk_we_asked_for() -> None:
    out, usage = tap_all(streamed_chat(asks=False), CHAT_STREAM)
    assert out == CHAT_HEAD + sse("[DONE]")  # every other byte identical
    assert usage == OPENAI_EXPECTED


def test_openai_completions_stream() -> None:
    stream = sse({"choices": [{"text": "hi"}], "model": "gpt-3.5-turbo-instruct", "usage": None})
    final = sse({"choices": [], "model": "gpt-3.5-turbo-instruct", "usage": {"prompt_tokens": 5}})
    out, usage = tap_all(streamed_chat(asks=False, path="/v1/completions"), stream + final)
    assert out == stream
    assert usage == Usage(5, 0, 0, "gpt-3.5-turbo-instruct")


def test_usage_on_a_chunk_with_choices_is_read_and_kept() -> None:
    # vLLM's continuous usage stats: cumulative usage on content chunks; the last one counts.
    first = chunk("a", usage={"prompt_tokens": 10, "completion_tokens": 1})
    last = chunk("b", usage={"prompt_tokens": 10, "completion_tokens": 2}, finish="stop")
    stream = sse(first, last, "[DONE]")
    out, usage = tap_all(streamed_chat(asks=False), stream)
    assert out == stream
    assert usage == Usage(10, 2, 0, "gpt-4o-mini-2024-07-18")


def test_a_stream_without_usage_has_none() -> None:
    out, usage = tap_all(streamed_chat(asks=False), CHAT_HEAD + sse("[DONE]"))
    assert out == CHAT_HEAD + sse("[DONE]") and usage is None


def message_start(**usage: int) -> dict[str, Any]:
    message: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": "claude-sonnet-4-5-20250929",
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    return {"type": "message_start", "message": message}


def message_delta(**usage: int | None) -> dict[str, Any]:
    delta = {"stop_reason": "end_turn", "stop_sequence": None}
    return {"type": "message_delta", "delta": delta, "usage": usage}


ANTHROPIC_STREAM = sse(
    message_start(
        input_tokens=25,
        cache_creation_input_tokens=100,
        cache_read_input_tokens=2000,
        output_tokens=1,
    ),
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
    {"type": "content_block_stop", "index": 0},
    message_delta(output_tokens=7),
    message_delta(output_tokens=15),
    {"type": "message_stop"},
    named=True,
)


def anthropic_request() -> LlmRequest:
    return post("/v1/messages", chat(model="claude-sonnet-4-5", max_tokens=1024, stream=True))


def test_anthropic_stream_input_from_start_and_cumulative_output_from_the_last_delta() -> None:
    out, usage = tap_all(anthropic_request(), ANTHROPIC_STREAM)
    assert out == ANTHROPIC_STREAM
    assert usage == Usage(125, 15, 2000, "claude-sonnet-4-5-20250929")


def test_anthropic_delta_input_counts_replace_the_start_ones() -> None:
    # message_delta counts are cumulative; with server tools they include input too.
    stream = sse(
        message_start(input_tokens=10, output_tokens=1),
        message_delta(input_tokens=30, cache_read_input_tokens=None, output_tokens=5),
        named=True,
    )
    assert tap_all(anthropic_request(), stream)[1] == Usage(30, 5, 0, "claude-sonnet-4-5-20250929")


def responses_event(kind: str, usage: Any) -> dict[str, Any]:
    response = {
        "id": "resp_1",
        "object": "response",
        "status": kind.rpartition(".")[2],
        "model": "gpt-4.1-2025-04-14",
        "output": [],
        "usage": usage,
    }
    return {"type": kind, "sequence_number": 1, "response": response}


RESPONSES_USAGE = {
    "input_tokens": 36,
    "input_tokens_details": {"cached_tokens": 16},
    "output_tokens": 87,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 123,
}


@pytest.mark.parametrize("final", ["response.completed", "response.incomplete"])
def test_responses_stream(final: str) -> None:
    stream = sse(
        responses_event("response.created", None),
        {"type": "response.output_text.delta", "sequence_number": 2, "delta": "Hi"},
        responses_event(final, RESPONSES_USAGE),
        named=True,
    )
    request = post("/v1/responses", chat(stream=True))
    out, usage = tap_all(request, stream)
    assert out == stream
    assert usage == Usage(20, 87, 16, "gpt-4.1-2025-04-14")


@pytest.mark.parametrize(
    ("path", "answer", "expected"),
    [
        (
            "/v1/chat/completions",
            {"object": "chat.completion", "model": "gpt-4o-2024-08-06", "usage": OPENAI_USAGE},
            Usage(176, 42, 1024, "gpt-4o-2024-08-06"),
        ),
        (
            "/v1/completions",
            {"model": "davinci-002", "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
            Usage(3, 4, 0, "davinci-002"),
        ),
        (
            "/v1/embeddings",
            {"object": "list", "model": "text-embedding-3-small", "usage": {"prompt_tokens": 8}},
            Usage(8, 0, 0, "text-embedding-3-small"),
        ),
        (
            "/v1/responses",
            {"object": "response", "model": "o3-2025-04-16", "usage": RESPONSES_USAGE},
            Usage(20, 87, 16, "o3-2025-04-16"),
        ),
        (
            "/v1/messages",
            {
                "type": "message",
                "model": "claude-opus-4-1-20250805",
                "usage": {
                    "input_tokens": 50,
                    "cache_creation_input_tokens": 5,
                    "cache_read_input_tokens": 500,
                    "output_tokens": 60,
                },
            },
            Usage(55, 60, 500, "claude-opus-4-1-20250805"),
        ),
    ],
)
def test_json_answers(path: str, answer: dict[str, Any], expected: Usage) -> None:
    payload = orjson.dumps(answer, option=orjson.OPT_INDENT_2)
    tap = UsageTap(post(path, chat()), "application/json; charset=utf-8")
    pieces = [payload[i : i + 7] for i in range(0, len(payload), 7)]
    assert [tap.feed(piece) for piece in pieces] == pieces  # through as they come
    assert tap.finish() == b""
    assert tap.usage == expected


@pytest.mark.parametrize(
    "payload",
    [
        b'{"error": {"message": "rate limited", "type": "rate_limit_error"}}',
        b'{"model": "m", "usage": null}',
        b'{"model": "m", "usage": {"prompt_tokens": "12"}}',
        b'{"model": "m", "usage": {"prompt_tokens": 1, "prompt_tokens_details": '
        b'{"cached_tokens": 2}}}',
        b'{"model": "m", "usage": {"prompt_tokens": -1}}',
        b'{"model": "m", "usage": [1]}',
        b'{"model": "m", "usage": {"prompt_tokens": 1, "prompt_tokens_details": 3}}',
        b'{"model": "m", "usage": {"prompt_tokens": 1',
        b"[]",
        b"\xff",
    ],
)
def test_json_answers_without_readable_usage(payload: bytes) -> None:
    out, usage = tap_all(post("/v1/chat/completions", chat()), payload, "application/json")
    assert out == payload and usage is None


def test_a_json_answer_over_the_cap_has_no_usage() -> None:
    payload = orjson.dumps({"model": "m", "pad": "x" * 100, "usage": {"prompt_tokens": 1}})
    tap = UsageTap(post("/v1/chat/completions", chat()), "application/json", max_json_bytes=64)
    assert run(tap, payload[:50], payload[50:]) == payload
    assert tap.usage is None


def test_an_anthropic_json_model_that_is_not_an_identifier_is_left_out() -> None:
    payload = b'{"model": "bad\\nmodel", "usage": {"input_tokens": 1, "output_tokens": 2}}'
    assert tap_all(anthropic_request(), payload, "application/json")[1] == Usage(1, 2, 0, None)


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream", ""])
def test_other_content_types_pass_through(content_type: str) -> None:
    out, usage = tap_all(streamed_chat(asks=False), CHAT_STREAM, content_type)
    assert out == CHAT_STREAM and usage is None


def test_other_requests_pass_through() -> None:
    request = describe("GET", "/v1/models", {}, b"", max_bytes=MAX)
    out, usage = tap_all(request, CHAT_STREAM)
    assert out == CHAT_STREAM and usage is None


# --- event framing ---------------------------------------------------------------------------


def crlf(stream: bytes, eol: bytes) -> bytes:
    return stream.replace(b"\n", eol)


FRAMING_CASES = [
    ("openai-strip", lambda: streamed_chat(asks=False), CHAT_STREAM),
    ("openai-keep", lambda: streamed_chat(asks=True), CHAT_STREAM),
    ("anthropic", anthropic_request, ANTHROPIC_STREAM),
    ("openai-strip-crlf", lambda: streamed_chat(asks=False), crlf(CHAT_STREAM, b"\r\n")),
    ("anthropic-crlf", anthropic_request, crlf(ANTHROPIC_STREAM, b"\r\n")),
    ("openai-strip-cr", lambda: streamed_chat(asks=False), crlf(CHAT_STREAM, b"\r")),
    ("anthropic-cr", anthropic_request, crlf(ANTHROPIC_STREAM, b"\r")),
]


@pytest.mark.parametrize(("case", "make", "stream"), FRAMING_CASES)
def test_one_byte_at_a_time_gives_the_same_output(case: str, make: Any, stream: bytes) -> None:
    whole, usage = tap_all(make(), stream)
    tap = UsageTap(make(), SSE)
    assert run(tap, *(stream[i : i + 1] for i in range(len(stream)))) == whole
    assert tap.usage == usage is not None


@pytest.mark.parametrize(("case", "make", "stream"), FRAMING_CASES)
def test_every_split_point_gives_the_same_output(case: str, make: Any, stream: bytes) -> None:
    whole, usage = tap_all(make(), stream)
    for cut in range(len(stream) + 1):
        tap = UsageTap(make(), SSE)
        assert run(tap, stream[:cut], stream[cut:]) == whole, cut
        assert tap.usage == usage


@pytest.mark.parametrize("eol", [b"\r\n", b"\r"])
def test_crlf_and_cr_streams_strip_the_usage_chunk_with_its_line_ends(eol: bytes) -> None:
    out, usage = tap_all(streamed_chat(asks=False), crlf(CHAT_STREAM, eol))
    assert out == crlf(CHAT_HEAD + sse("[DONE]"), eol)
    assert usage == OPENAI_EXPECTED


def test_mixed_line_ends_and_comments() -> None:
    usage = orjson.dumps(chunk(None, usage=OPENAI_USAGE))
    stream = b": keep-alive\r\n\r\ndata:" + usage + b"\r\nid: 7\n\r" + b"data: [DONE]\n\n"
    out, read = tap_all(streamed_chat(asks=True), stream)
    assert out == stream and read == OPENAI_EXPECTED


def test_a_data_field_split_over_lines_is_joined() -> None:
    body = orjson.dumps(chunk(None, usage=OPENAI_USAGE)).decode()
    # Joined with LF, the JSON still parses: the cut is between two tokens.
    cut = body.index(",", len(body) // 2)
    stream = f"data: {body[:cut]}\ndata: {body[cut:]}\n\n".encode()
    out, usage = tap_all(streamed_chat(asks=False), stream)
    assert out == b"" and usage == OPENAI_EXPECTED


def test_a_byte_order_mark_before_the_first_event_is_skipped() -> None:
    stream = b"\xef\xbb\xbf" + CHAT_USAGE
    out, usage = tap_all(streamed_chat(asks=True), stream)
    assert out == stream and usage == OPENAI_EXPECTED


def test_each_event_is_sent_as_soon_as_it_is_complete() -> None:
    first = sse(chunk("Hel"))
    tap = UsageTap(streamed_chat(asks=False), SSE)
    assert tap.feed(first + b"data: {") == first
    assert tap.feed(b'"x": 1}\n') == b""
    assert tap.feed(b"\n") == b'data: {"x": 1}\n\n'


def test_an_unterminated_last_event_is_read_and_returned_at_finish() -> None:
    stream = CHAT_HEAD + CHAT_USAGE.rstrip(b"\n")
    tap = UsageTap(streamed_chat(asks=True), SSE)
    assert tap.feed(stream) == CHAT_HEAD
    assert tap.finish() == CHAT_USAGE.rstrip(b"\n")
    assert tap.usage == OPENAI_EXPECTED
    assert tap.finish() == b""


def test_a_1mb_stream_in_4kb_chunks_is_not_buffered() -> None:
    events = [sse(chunk(f"token {i} " + "x" * 150)) for i in range(6000)]
    stream = b"".join(events) + CHAT_USAGE + sse("[DONE]")
    assert len(stream) > 1 << 20
    longest = max(len(event) for event in events)
    tap = UsageTap(streamed_chat(asks=True), SSE)
    sent = 0
    for offset in range(0, len(stream), 4096):
        out = tap.feed(stream[offset : offset + 4096])
        if offset == 0:
            assert out.startswith(events[0])  # the first event leaves on the first feed
        sent += len(out)
        fed = min(offset + 4096, len(stream))
        assert fed - sent <= longest  # never more than the event in progress held
    assert sent + len(tap.finish()) == len(stream)
    assert tap.usage == OPENAI_EXPECTED


def test_an_event_over_the_cap_ends_reading_and_passes_through() -> None:
    big = sse(chunk("x" * 200))
    stream = big + CHAT_USAGE
    tap = UsageTap(streamed_chat(asks=True), SSE, max_json_bytes=100)
    assert run(tap, stream[:150], stream[150:]) == stream
    assert tap.usage is None


@pytest.mark.parametrize(
    "bad",
    [
        b'data: {"usage": {"prompt_tokens": 5}\n\n',  # not JSON
        b'data: {"usage": {"prompt_tokens": 5.5}, "choices": []}\n\n',
        b'data: {"usage": {"prompt_tokens": true}, "choices": []}\n\n',
        b'data: {"usage": "lots", "choices": []}\n\n',
        b'data: {"usage": {"prompt_tokens": 1, "prompt_tokens_details": {"cached_tokens": 9}}}\n\n',
        b'data: {"usage": {}, "x": "\xff"}\n\n',  # not UTF-8
    ],
)
def test_a_malformed_usage_event_leaves_usage_none_and_bytes_unchanged(bad: bytes) -> None:
    stream = CHAT_HEAD + bad + CHAT_USAGE + sse("[DONE]")
    out, usage = tap_all(streamed_chat(asks=True), stream)
    assert out == stream and usage is None


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "message_start", "message": "no", "usage": 1},
        {"type": "message_start", "message": {"usage": None}},
        {"type": "message_delta", "usage": {"output_tokens": -3}},
        {"type": "message_delta", "usage": [1]},
    ],
)
def test_malformed_anthropic_events(bad: dict[str, Any]) -> None:
    stream = ANTHROPIC_STREAM + sse(bad, named=True)
    out, usage = tap_all(anthropic_request(), stream)
    assert out == stream and usage is None


def test_a_malformed_responses_event() -> None:
    stream = sse({"type": "response.completed", "response": None, "usage": 1})
    out, usage = tap_all(post("/v1/responses", chat(stream=True)), stream)
    assert out == stream and usage is None


def test_events_that_merely_mention_usage_are_harmless() -> None:
    stream = sse(chunk('the word "usage"'), "not json but no usage key", "[DONE]")
    out, usage = tap_all(streamed_chat(asks=False), stream)
    assert out == stream and usage is None
