"""The LLM adapter: an OpenAI- or Anthropic-style request in, an `Action` out; the upstream's
answer in, the same bytes out and the token usage read on the way.

Pure, like the HTTP and MCP adapters: nothing here opens a socket or imports aiohttp. The shell
forwards `LlmRequest.body` and passes every response chunk through `UsageTap.feed`, sending on
what it returns at once, so metering never buffers a stream or delays an event.

Action names (policy globs match them; a model may hold "/", so `llm:chat/**` is "any model"):

- `llm:chat/<model>`         POST …/v1/chat/completions  (OpenAI-compatible)
- `llm:completions/<model>`  POST …/v1/completions
- `llm:embeddings/<model>`   POST …/v1/embeddings
- `llm:responses/<model>`    POST …/v1/responses
- `llm:messages/<model>`     POST …/v1/messages          (Anthropic)
- `llm:other/<METHOD> <path>` anything else (`llm:other/GET /v1/models`,
  `llm:other/POST /v1/messages/batches`): not read, not metered, `args` is {}. Batch and file
  endpoints can still spend money, so the default deny should cover `llm:other/**`.

Any path prefix before `/v1/` is accepted (`/openai/v1/chat/completions`), since gateways
mount these APIs under their own prefix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson

from agentproxy.core import Action, is_safe_identifier
from agentproxy.errors import BadRequest, PayloadTooLarge, Refusal
from agentproxy.protocols import sse
from agentproxy.protocols.body import check_json_content_type, decode_content
from agentproxy.protocols.http import MAX_PATH_LENGTH, WireReply
from agentproxy.protocols.http import render as http_render
from agentproxy.protocols.http_token import TOKEN
from agentproxy.protocols.strict_json import JsonError, parse_request

__all__ = [
    "ACTION_PREFIX",
    "MAX_JSON_BYTES",
    "LlmRequest",
    "Provider",
    "Usage",
    "UsageTap",
    "describe",
    "estimate_input_tokens",
]

ACTION_PREFIX: Final = "llm:"
# The default cap on a JSON answer kept for reading usage, and on one buffered stream event.
MAX_JSON_BYTES: Final = 8 << 20

Provider = Literal["openai", "anthropic", "other"]

# Path suffix, operation, provider. "/v1/completions" cannot match "/v1/chat/completions".
_ENDPOINTS: Final[tuple[tuple[str, str, Provider], ...]] = (
    ("/v1/chat/completions", "chat", "openai"),
    ("/v1/completions", "completions", "openai"),
    ("/v1/embeddings", "embeddings", "openai"),
    ("/v1/responses", "responses", "openai"),
    ("/v1/messages", "messages", "anthropic"),
)
# The operations whose streams carry usage only when asked (stream_options.include_usage).
_USAGE_OPT_IN: Final = frozenset({"chat", "completions"})
_MAX_TOKENS_FIELDS: Final = ("max_tokens", "max_completion_tokens", "max_output_tokens")

# A normalized path is visible ASCII (http.normalize_path) with no query.
_PATH = re.compile(r"/[\x21-\x3e\x40-\x7e]*")


@dataclass(frozen=True, slots=True)
class LlmRequest:
    """One request to an LLM API, named for policy and prepared for metering.

    `body` is what to forward. For a recognized operation it is the decoded JSON (after gzip;
    drop Content-Encoding and set Content-Length), re-serialized only when usage reporting had
    to be switched on, else byte for byte what the client sent; for `other` it is the body as
    received (keep its Content-Encoding). `max_tokens` is the largest of max_tokens,
    max_completion_tokens and max_output_tokens, for reserving budget. `strip_usage` says the
    usage chunk was asked for by us, not the client, and `UsageTap` removes it again.
    """

    action: Action
    provider: Provider
    operation: str
    model: str | None
    stream: bool
    max_tokens: int | None
    body: bytes = field(repr=False)
    strip_usage: bool

    def __post_init__(self) -> None:
        other = self.operation == "other"
        if other != (self.model is None) or other != (self.provider == "other"):
            raise ValueError("only an `other` request lacks a model and a provider")
        if self.strip_usage and not (self.stream and self.operation in _USAGE_OPT_IN):
            raise ValueError("strip_usage applies only to streamed chat and completions")


# --- describe --------------------------------------------------------------------------------


def describe(
    method: str, path: str, headers: Mapping[str, str], body: bytes, *, max_bytes: int
) -> LlmRequest:
    """Name a request to an LLM API as an `Action` and prepare the body to forward.

    `path` is the normalized path without its query (the HTTP adapter's action target);
    `headers` has lower-case names. A POST to one of the five endpoints is read as JSON with
    the MCP adapter's strictness; anything else is `llm:other/<METHOD> <path>` and its body is
    not read. A streamed chat or completions request that does not ask for usage gets
    `"stream_options": {"include_usage": true}` (other stream_options members kept): OpenAI
    sends streamed usage only then, and unmetered streams are how LiteLLM recorded streamed
    spend as 0 (BerriAI/litellm#37923).

    Raises:
        BadRequest: the method is not a token, or the path not a normalized path; for the five
            endpoints: Content-Type not application/json (or a charset other than utf-8), a
            Content-Encoding other than identity or gzip or a corrupt gzip stream, a body that
            is not one strict UTF-8 JSON object (detail "parse error: …" for duplicate keys,
            keys colliding under case folding or NFKC, NaN, out-of-range numbers, lone
            surrogates, deep nesting, too many values), `model` not a non-empty
            string of at most 256 printable characters, `stream` not a boolean, a max-tokens
            field not a non-negative integer, `stream_options` not an object or its
            `include_usage` not a boolean.
        PayloadTooLarge: the body, or its gzip-decoded form, exceeds `max_bytes`, or gzip
            inflates it past the ratio `body.decode_content` allows.
    """
    if len(method) > 32 or not TOKEN.fullmatch(method):
        raise BadRequest("request method is not an RFC 9110 token")
    if len(path) > MAX_PATH_LENGTH or not _PATH.fullmatch(path):
        raise BadRequest("not a normalized request path")
    endpoint = _endpoint(path) if method == "POST" else None
    if endpoint is None:
        action = Action("llm", "other", path, args={}, name=f"{ACTION_PREFIX}other/{method} {path}")
        return LlmRequest(action, "other", "other", None, False, None, body, False)
    operation, provider = endpoint

    if len(body) > max_bytes:
        raise PayloadTooLarge(f"request body larger than {max_bytes} bytes")
    check_json_content_type(headers.get("content-type"))
    raw = decode_content(headers.get("content-encoding"), body, max_bytes)
    try:
        document = parse_request(raw)
    except JsonError as exc:
        raise BadRequest(f"parse error: {exc}") from None
    if not isinstance(document, dict):
        raise BadRequest("an LLM API request body is a JSON object")
    model = document.get("model")
    if not isinstance(model, str) or not is_safe_identifier(model):
        raise BadRequest('"model" must be a non-empty string of at most 256 printable characters')
    stream = document.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest('"stream" must be a boolean')
    stream = bool(stream)
    strip_usage = stream and operation in _USAGE_OPT_IN and _ask_for_usage(document)
    # Policy sees what the upstream will read: the injected member included.
    forward = orjson.dumps(document) if strip_usage else raw
    max_tokens = _max_tokens(document)
    facts = {
        "model": model,
        "max_output_tokens": max_tokens,
        "stream": stream,
        "tools": _tool_names(document),
        "operation": operation,
        "provider": provider,
    }
    action = Action(
        "llm",
        operation,
        model,
        args=document,
        name=f"{ACTION_PREFIX}{operation}/{model}",
        llm=facts,
    )
    return LlmRequest(action, provider, operation, model, stream, max_tokens, forward, strip_usage)


def _tool_names(document: dict[str, Any]) -> list[str]:
    """The names of the tools a request offers the model, whichever API's shape: chat's
    {"type": "function", "function": {"name"}}, the Responses API's {"type": "function",
    "name"}, Anthropic's {"name"}; a built-in tool by its type ("web_search")."""
    names: list[str] = []
    tools = document.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        if not isinstance(tool, dict):
            continue
        function = tool.get("function")
        name = function.get("name") if isinstance(function, dict) else tool.get("name")
        if not isinstance(name, str):
            name = tool.get("type")
        if isinstance(name, str):
            names.append(name)
    return names


def _endpoint(path: str) -> tuple[str, Provider] | None:
    # A trailing "/" is ignored: an upstream that serves "/v1/chat/completions/" too must not
    # turn a metered call into an unmetered `other` one.
    trimmed = path.rstrip("/")
    for suffix, operation, provider in _ENDPOINTS:
        if trimmed.endswith(suffix):
            return operation, provider
    return None


def _max_tokens(document: dict[str, Any]) -> int | None:
    found: int | None = None
    for name in _MAX_TOKENS_FIELDS:
        value = document.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadRequest(f'"{name}" must be a non-negative integer')
        # Two fields (chat's deprecated max_tokens beside max_completion_tokens): reserve for
        # the larger, the one an upstream may honour.
        found = value if found is None else max(found, value)
    return found


def _ask_for_usage(document: dict[str, Any]) -> bool:
    """Make the streamed request ask for usage in place; True if it did not already."""
    options = document.get("stream_options")
    if options is None:
        document["stream_options"] = {"include_usage": True}
        return True
    if not isinstance(options, dict):
        raise BadRequest('"stream_options" must be an object')
    include = options.get("include_usage")
    if include is True:
        return False
    if include is not None and not isinstance(include, bool):
        raise BadRequest('"stream_options.include_usage" must be a boolean')
    options["include_usage"] = True
    return True


def estimate_input_tokens(request: LlmRequest) -> int:
    """Input tokens to reserve budget for before the call: one per 3 bytes of body, rounded up.

    BPE tokens average about 4 bytes of English text and the JSON framing adds more bytes, so
    this over-counts typical requests; the real usage settles the reservation afterwards.
    `other` requests are not metered: 0.
    """
    if request.operation == "other":
        return 0
    return -(-len(request.body) // 3)


# --- usage -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Usage:
    """Tokens of one call, normalized so each count has one price.

    `input` is input billed at the input price: OpenAI's prompt_tokens / input_tokens minus
    their cached_tokens (OpenAI counts cache hits inside the prompt); Anthropic's input_tokens
    plus cache_creation_input_tokens (Anthropic counts neither cache field inside input_tokens;
    cache writes cost 1.25-2x input, so pricing them at input under-counts them slightly).
    `cached_input` is cache reads, billed at the cached price: OpenAI's cached_tokens,
    Anthropic's cache_read_input_tokens. `output` includes reasoning tokens (both APIs already
    count them there). `response_model` is the model the upstream says answered.
    """

    input: int = 0
    output: int = 0
    cached_input: int = 0
    response_model: str | None = None


class _Unreadable(ValueError):
    """The answer's usage is there but not in the shape the API documents."""


_OPENAI_CHAT_KEYS: Final = ("prompt_tokens", "completion_tokens", "prompt_tokens_details")
_OPENAI_RESPONSES_KEYS: Final = ("input_tokens", "output_tokens", "input_tokens_details")
_ANTHROPIC_KEYS: Final = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
# Responses API events whose `response.usage` is final; an incomplete (max_output_tokens) or
# failed response is billed too.
_RESPONSES_FINAL: Final = frozenset(
    {"response.completed", "response.incomplete", "response.failed"}
)


def _count(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Unreadable("a token count is not a non-negative integer")
    return value


def _model_name(value: Any) -> str | None:
    # It becomes a metric label: keep only a safe identifier.
    return value if isinstance(value, str) and is_safe_identifier(value) else None


def _openai_usage(usage: Any, model: Any, keys: tuple[str, str, str]) -> Usage:
    input_key, output_key, details_key = keys
    if not isinstance(usage, dict):
        raise _Unreadable("usage is not an object")
    details = usage.get(details_key)
    if details is not None and not isinstance(details, dict):
        raise _Unreadable("usage details are not an object")
    prompt = _count(usage.get(input_key))
    cached = _count(details.get("cached_tokens")) if details is not None else 0
    if cached > prompt:
        raise _Unreadable("more cached tokens than input tokens")
    return Usage(prompt - cached, _count(usage.get(output_key)), cached, _model_name(model))


def _anthropic_counts(usage: Any) -> dict[str, int]:
    """The counts `usage` carries (absent and null ones left out)."""
    if not isinstance(usage, dict):
        raise _Unreadable("usage is not an object")
    return {key: _count(usage[key]) for key in _ANTHROPIC_KEYS if usage.get(key) is not None}


def _anthropic_usage(counts: Mapping[str, int], model: str | None) -> Usage:
    return Usage(
        input=counts.get("input_tokens", 0) + counts.get("cache_creation_input_tokens", 0),
        output=counts.get("output_tokens", 0),
        cached_input=counts.get("cache_read_input_tokens", 0),
        response_model=model,
    )


# --- the tap ---------------------------------------------------------------------------------


class UsageTap:
    """Reads token usage from an upstream answer while passing its bytes on.

    Feed it the response body decoded (after Content-Encoding) chunk by chunk and send on what
    `feed` returns immediately; at the end send what `finish` returns. Then `usage` holds the
    call's `Usage`, or None when the answer carried none or it could not be read.

    - `text/event-stream`: events are cut at blank lines (LF, CRLF or CR, split anywhere
      between chunks) and each is returned as soon as its blank line arrives; only the event
      in progress is held. Usage comes from OpenAI chunks with a non-null `usage` (the last
      wins), the Responses API's `response.completed`/`incomplete`/`failed`, and Anthropic's
      `message_start` and `message_delta` (whose counts are cumulative). With
      `request.strip_usage` the usage-only chunk (empty `choices`) is dropped, byte for byte.
      An event larger than `max_json_bytes` ends reading: it and the rest pass through as
      they come and `usage` is None.
    - `application/json`: chunks pass through unchanged; a copy up to `max_json_bytes` is
      read at `finish` (beyond it, `usage` is None).
    - Anything else, or an `other` request: passed through, `usage` None.

    Never raises on a malformed answer: whatever cannot be read leaves `usage` None and the
    bytes unchanged.
    """

    __slots__ = (
        "_after_cr",
        "_anthropic",
        "_event",
        "_failed",
        "_finished",
        "_json",
        "_kind",
        "_last_dropped",
        "_line_open",
        "_max",
        "_model",
        "_request",
        "_started",
        "_usage",
    )

    def __init__(
        self, request: LlmRequest, content_type: str, *, max_json_bytes: int = MAX_JSON_BYTES
    ) -> None:
        media = content_type.partition(";")[0].strip().lower()
        self._kind: Literal["sse", "json", "pass"] = "pass"
        if request.operation != "other" and media == "text/event-stream":
            self._kind = "sse"
        elif request.operation != "other" and media == "application/json":
            self._kind = "json"
        self._request = request
        self._max = max_json_bytes
        self._usage: Usage | None = None
        self._failed = False
        self._finished = False
        self._json: bytearray | None = bytearray()  # None once over the cap
        self._event = bytearray()  # the event in progress
        self._line_open = False  # the event's last line has bytes but no line ending yet
        self._after_cr = False  # the last chunk ended in CR: an LF next completes a CRLF
        self._last_dropped = False
        self._started = False
        self._anthropic: dict[str, int] = {}
        self._model: str | None = None

    @property
    def usage(self) -> Usage | None:
        return None if self._failed else self._usage

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send to the client now."""
        if self._kind == "json":
            self._keep(chunk)
            return chunk
        if self._kind == "pass" or not chunk:
            return chunk
        return self._feed_events(chunk)

    def finish(self) -> bytes:
        """The bytes still to send at the end of the answer (an unterminated last event)."""
        if self._finished:
            return b""
        self._finished = True
        if self._kind == "json" and self._json is not None:
            self._read_json(bytes(self._json))
            self._json = None
        if self._kind != "sse" or not self._event:
            return b""
        # A client drops an unterminated event, but the upstream counted its tokens: read it.
        event = bytes(self._event)
        self._event.clear()
        return event if self._dispatch(event) else b""

    # --- application/json --------------------------------------------------------------------

    def _keep(self, chunk: bytes) -> None:
        if self._json is None:
            return
        if len(self._json) + len(chunk) > self._max:
            self._json = None
            self._failed = True
            return
        self._json += chunk

    def _read_json(self, payload: bytes) -> None:
        try:
            document = orjson.loads(payload)
            if not isinstance(document, dict) or document.get("usage") is None:
                return  # an error answer, or an upstream that reports no usage
            usage = document["usage"]
            operation = self._request.operation
            if operation == "messages":
                counts = _anthropic_counts(usage)
                self._usage = _anthropic_usage(counts, _model_name(document.get("model")))
            else:
                keys = _OPENAI_RESPONSES_KEYS if operation == "responses" else _OPENAI_CHAT_KEYS
                self._usage = _openai_usage(usage, document.get("model"), keys)
        except ValueError:
            self._failed = True

    # --- text/event-stream -------------------------------------------------------------------

    def _feed_events(self, chunk: bytes) -> bytes:
        out = bytearray()
        start = 0
        if self._after_cr:
            self._after_cr = False
            if chunk[:1] == b"\n":
                # The LF of a CRLF whose CR ended the last chunk: it belongs to that line.
                if self._event:
                    self._event += b"\n"
                elif not self._last_dropped:
                    out += b"\n"
                start = 1
        copied = start  # chunk[:copied] is in `out` or in the event buffer already
        line_start = start
        for match in sse.LINE_END.finditer(chunk, start):
            blank = match.start() == line_start and not self._line_open
            self._line_open = False
            line_start = match.end()
            if blank:  # a blank line ends the event
                event = bytes(self._event) + chunk[copied : match.end()]
                self._event.clear()
                copied = match.end()
                keep = self._dispatch(event)
                self._last_dropped = not keep
                if keep:
                    out += event
        if line_start < len(chunk):
            self._line_open = True
        elif chunk.endswith(b"\r"):
            self._after_cr = True
        self._event += chunk[copied:]
        if len(self._event) > self._max:
            # An event this large is not one we read usage from; hold no more of it.
            out += self._event
            self._event.clear()
            self._kind = "pass"
            self._failed = True
        return bytes(out)

    def _dispatch(self, event: bytes) -> bool:
        """Read usage from a complete event; False to drop it."""
        first = not self._started
        self._started = True
        # Every usage-bearing event names "usage"; the others need not be parsed. After a
        # failure events are still read, so that the chunk we asked for is still removed.
        if b'"usage"' not in event:
            return True
        try:
            data = _event_data(event, first=first)
            if not data or data == "[DONE]":
                return True
            message = orjson.loads(data)
            if not isinstance(message, dict):
                return True
            return self._read_event(message)
        except ValueError:
            self._failed = True
            return True

    def _read_event(self, message: dict[str, Any]) -> bool:
        operation = self._request.operation
        if operation in _USAGE_OPT_IN:
            usage = message.get("usage")
            if usage is None:
                return True
            self._usage = _openai_usage(usage, message.get("model"), _OPENAI_CHAT_KEYS)
            choices = message.get("choices")
            return not (self._request.strip_usage and not choices)
        kind = message.get("type")
        if operation == "responses" and kind in _RESPONSES_FINAL:
            response = message.get("response")
            if not isinstance(response, dict):
                raise _Unreadable("response event without a response")
            if response.get("usage") is not None:
                keys = _OPENAI_RESPONSES_KEYS
                self._usage = _openai_usage(response["usage"], response.get("model"), keys)
        elif operation == "messages" and kind == "message_start":
            started = message.get("message")
            if not isinstance(started, dict):
                raise _Unreadable("message_start without a message")
            self._anthropic = _anthropic_counts(started.get("usage"))
            self._model = _model_name(started.get("model"))
            self._usage = _anthropic_usage(self._anthropic, self._model)
        elif operation == "messages" and kind == "message_delta":
            # Cumulative counts: each one present replaces the earlier value.
            self._anthropic.update(_anthropic_counts(message.get("usage")))
            self._usage = _anthropic_usage(self._anthropic, self._model)
        return True


def _event_data(event: bytes, *, first: bool) -> str:
    """The event's data (WHATWG HTML §9.2.6); the stream's first event may start with a BOM."""
    text = event.decode("utf-8")
    if first and text.startswith(sse.BOM):
        text = text[1:]
    return sse.data_of(sse.LINE_END_TEXT.split(text))


# --- refusals --------------------------------------------------------------------------------

_OPENAI_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_exceeded",
}
_ANTHROPIC_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def provider_of(path: str) -> Provider:
    """Whose API a path is (for refusals of calls that were never described)."""
    endpoint = _endpoint(path)
    return endpoint[1] if endpoint is not None else "openai"


def render(refusal: Refusal, *, decision_id: str, provider: Provider) -> WireReply:
    """A refusal in the provider's own error shape, so that every SDK shows why: OpenAI's
    {"error": {"message", "type", "code", "param"}}, Anthropic's {"type": "error", "error":
    {"type", "message"}}; `message` is the reason, and `decision_id`, `rule`, the problem
    type and the refusal's members ride along. Status and headers (Retry-After,
    WWW-Authenticate) are the problem+json rendering's. Never raises."""
    plain = http_render(refusal, decision_id=decision_id)
    extra: dict[str, object] = {"decision_id": decision_id, "problem": refusal.problem_type}
    if refusal.rule is not None:
        extra["rule"] = refusal.rule
    for name, value in refusal.members.items():
        extra.setdefault(name, value)
    if provider == "anthropic":
        kind = _ANTHROPIC_TYPES.get(refusal.status, "api_error")
        body: dict[str, object] = {
            "type": "error",
            "error": {"type": kind, "message": refusal.detail, **extra},
        }
    else:
        kind = _OPENAI_TYPES.get(refusal.status, "server_error")
        body = {
            "error": {
                "message": refusal.detail,
                "type": kind,
                "code": refusal.problem_type.rsplit("/", 1)[-1],
                "param": None,
                **extra,
            }
        }
    headers = tuple(
        ("Content-Type", "application/json") if name == "Content-Type" else (name, value)
        for name, value in plain.headers
    )
    return WireReply(plain.status, headers, orjson.dumps(body))
