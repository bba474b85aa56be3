"""The LLM API shell: the HTTP exchange, reading tokens from the answer as it passes.

After the caller is authenticated it reads the (bounded) JSON request so policy sees
`llm:chat/gpt-4o` with `args.model`, `args.max_tokens`…; forwards the body the adapter
returns (with `stream_options.include_usage` injected where OpenAI needs it); and taps the
answer: every event goes to the client as soon as it is complete, and the usage it carries
is counted (the usage-only chunk the client did not ask for is dropped).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import replace

from agentproxy.config.model import Upstream
from agentproxy.core import Call
from agentproxy.errors import Refusal
from agentproxy.protocols import llm
from agentproxy.protocols.http import WireReply
from agentproxy.proxy.http import HttpExchange
from agentproxy.proxy.http_wire import Response, StreamResponse
from agentproxy.proxy.offload import parse_off_loop
from agentproxy.proxy.upstream import UpstreamAnswer
from agentproxy.telemetry.messages import output_text


def described(call: Call, parsed: llm.LlmRequest, upstream: Upstream) -> None:
    """The call as an LLM request names it: its action on this upstream, its model, and the
    tokens it may cost (what budgets reserve). Shared with the ext_authz shell."""
    call.action = replace(parsed.action, upstream=upstream.name)
    call.model = parsed.model
    call.estimate = (llm.estimate_input_tokens(parsed), parsed.max_tokens)


def refusal_reply(
    refusal: Refusal, decision_id: str, parsed: llm.LlmRequest | None, path: str
) -> WireReply:
    """A refusal in the shape of the API the request is for (as described, else by path)."""
    provider = parsed.provider if parsed is not None else "other"
    if provider == "other":
        provider = llm.provider_of(path)
    return llm.render(refusal, decision_id=decision_id, provider=provider)


class LlmExchange(HttpExchange):
    parsed: llm.LlmRequest | None = None
    tap: llm.UsageTap | None = None
    # Reasoning capture: the answer as it passed, at most `_capture_limit` bytes of it.
    captured: bytearray | None = None
    _capture_limit = 0
    _content_type = ""

    async def describe(self, call: Call) -> None:
        """Reads the body (bounded by `max_body_bytes`), off the loop when it is large or
        compressed. Raises BadRequest or PayloadTooLarge for a body that cannot be read
        unambiguously, LimitRefused when this agent already has too many large bodies being
        read."""
        upstream = self.upstream
        if upstream is None:
            return
        body = b""
        if self.request.method == "POST":
            body = await self._read_body(call, upstream.max_body_bytes)
        headers = {k.lower(): v for k, v in self.request.headers.items()}
        read = functools.partial(
            llm.describe,
            self.request.method,
            self.path,
            headers,
            body,
            max_bytes=upstream.max_body_bytes,
        )
        agent = call.principal.agent if call.principal is not None else ""
        parsed = await parse_off_loop(agent, body, headers.get("content-encoding"), read)
        self.parsed = parsed
        described(call, parsed, upstream)

    async def refuse(self, call: Call) -> None:
        """The refusal in the provider's own error shape (OpenAI or Anthropic), so the SDKs
        show its reason and decision id, not a bare status."""
        refusal = call.refusal
        if refusal is None:
            raise ValueError("refuse() needs call.refusal")
        reply = refusal_reply(refusal, call.id, self.parsed, self.path)
        response = Response(status=reply.status, body=reply.body)
        for name, value in reply.headers:
            response.headers.add(name, value)
        response.headers["Server"] = "agentproxy"
        if self.request.body_exists and self.parsed is None:
            response.force_close()  # the body was not read
        call.status = reply.status
        self.response = response

    def _request_data(self, call: Call, upstream: Upstream) -> AsyncIterator[bytes] | bytes | None:
        if self.parsed is None or self.request.method != "POST":
            return None
        return self.parsed.body

    def _upstream_headers(self, call: Call, upstream: Upstream) -> list[tuple[str, str]]:
        # A metered request's body goes out decoded (and maybe rewritten), and aiohttp sets
        # its length; any other request's body goes as received. Ask for an uncompressed
        # answer: usage is read from it as it passes.
        dropped = {"accept-encoding"}
        if self.parsed is not None and self.parsed.operation != "other":
            dropped |= {"content-encoding", "content-length"}
        headers = super()._upstream_headers(call, upstream)
        return [(k, v) for k, v in headers if k.lower() not in dropped]

    def _adjust_response_headers(
        self, upstream_response: UpstreamAnswer, response: StreamResponse
    ) -> None:
        if self.parsed is None:
            return
        content_type = upstream_response.headers.get("Content-Type", "")
        self.tap = llm.UsageTap(self.parsed, content_type)
        telemetry = self.runtime.config.telemetry
        if telemetry.capture_messages and self.parsed.operation != "other":
            # A stream's events carry more framing than text: keep a few times the bound.
            self.captured, self._content_type = bytearray(), content_type
            self._capture_limit = 4 * telemetry.max_message_bytes
        if self.parsed.strip_usage and "Content-Length" in response.headers:
            del response.headers["Content-Length"]  # a dropped chunk changes the length

    def _tap(self, chunk: bytes) -> bytes:
        captured = self.captured
        if captured is not None and len(captured) < self._capture_limit:
            captured += chunk[: self._capture_limit - len(captured)]
        return chunk if self.tap is None else self.tap.feed(chunk)

    def _tap_end(self, call: Call) -> bytes:
        if self.tap is None:
            return b""
        if self.captured is not None:
            call.completion = output_text(bytes(self.captured), self._content_type)
        rest = self.tap.finish()
        usage = self.tap.usage
        if usage is not None:
            call.tokens = (usage.input, usage.output, usage.cached_input)
            call.model = usage.response_model or call.model
        return rest
