"""An LLM call's span carries the GenAI conventions' model and usage (never the prompt or the
provider's key); the `telemetry:` section and the `OTEL_*` variables decide whether and where
spans go."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anthropic
import openai
import orjson
import pytest

from agentproxy.config import ConfigError
from agentproxy.config.model import TelemetrySettings
from agentproxy.proxy.runtime import load_config
from agentproxy.telemetry import resolve
from tests.conftest import Keys, ProxyFactory, write_config
from tests.harness.llm_upstream import REPLY_TEXT, LlmUpstream, Usage
from tests.telemetry.conftest import telemetry
from tests.telemetry.receiver import Received

POLICY = """
default: deny
rules:
  - id: chat
    agents: [writer]
    actions: ["llm:chat/**"]
    effect: allow
"""
PRICES = """
metering:
  currency: USD
  prices:
    "gpt-4o*": {input_per_mtok: 2.5, output_per_mtok: 10, cached_input_per_mtok: 1.25}
"""


async def test_an_llm_call_is_a_genai_span_with_usage_and_cost(
    make_proxy: ProxyFactory, keys: Keys, llm_upstream: LlmUpstream, collector: Received
) -> None:
    proxy = await make_proxy(
        policy=POLICY,
        upstream_url=llm_upstream.url,
        upstream_extra="    protocol: llm",
        extra=PRICES + telemetry(collector),
    )
    llm_upstream.usage["gpt-4o"] = Usage(input=1000, output=500, cached_input=200)
    llm_upstream.served_model["gpt-4o"] = "gpt-4o-2024-08-06"
    token = keys.token("writer")
    client = openai.AsyncOpenAI(base_url=proxy.base + "/v1", api_key=token, max_retries=0)
    async with client:
        await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "the secret plan is X-77"}]
        )
    spans = await collector.wait(4)
    (server,) = [s for s in spans if s.kind == 2]
    assert server.name == "chat gpt-4o"
    attrs = server.attributes
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "gpt-4o"
    assert attrs["gen_ai.response.model"] == "gpt-4o-2024-08-06"
    assert attrs["gen_ai.usage.input_tokens"] == 1200  # cached input is input too
    assert attrs["gen_ai.usage.output_tokens"] == 500
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == 200
    assert attrs["agentproxy.cost"] == pytest.approx((1000 * 2.5 + 200 * 1.25 + 500 * 10) / 1e6)
    assert attrs["agentproxy.cost.currency"] == "USD"
    exported = b"".join(collector.raw)
    assert b"X-77" not in exported and token.encode() not in exported


def settings_of(tmp_path: Path, keys: Keys, section: str) -> TelemetrySettings:
    return load_config(write_config(tmp_path, keys, "http://127.0.0.1:1", extra=section)).telemetry


def test_the_section_is_checked_whole(tmp_path: Path, keys: Keys) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_of(
            tmp_path,
            keys,
            "telemetry:\n"
            "  otlp: {endpoint: 'collector:4317', protocol: thrift, headers: x}\n"
            "  sample_ratio: 1.5\n"
            "  max_queue_size: 0\n",
        )
    text = str(caught.value)
    for problem in (
        "$.telemetry.otlp.endpoint: must be an http(s) URL",
        "$.telemetry.otlp.protocol: must be one of grpc, http/protobuf",
        "$.telemetry.otlp.headers: unknown key",
        "$.telemetry.sample_ratio: must be between 0 and 1",
        "$.telemetry.max_queue_size: must be between 1 and 1000000",
    ):
        assert problem in text
    good = settings_of(
        tmp_path,
        keys,
        "telemetry: {otlp: {endpoint: 'http://c:4318', protocol: http/protobuf},"
        " sample_ratio: 0}\n",
    )
    assert good == TelemetrySettings("http://c:4318", "http/protobuf", 0.0)
    assert settings_of(tmp_path, keys, "") == TelemetrySettings()


def test_off_unless_an_endpoint_is_named_and_otel_variables_fill_the_rest() -> None:
    assert resolve(TelemetrySettings(), {}) is None
    assert resolve(TelemetrySettings(), {"OTEL_TRACES_SAMPLER_ARG": "0.5"}) is None
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
    }
    found = resolve(TelemetrySettings(), env)
    assert found is not None
    # The exporter reads the endpoint (and headers, TLS) from the environment itself.
    assert (found.endpoint, found.protocol, found.ratio) == (None, "http/protobuf", 0.25)
    # The section wins over the variables.
    configured = resolve(TelemetrySettings("http://d:4317", "grpc", 1.0), env)
    assert configured is not None
    assert (configured.endpoint, configured.protocol, configured.ratio) == (
        "http://d:4317",
        "grpc",
        1.0,
    )
    assert resolve(TelemetrySettings("http://d:4317"), {"OTEL_SDK_DISABLED": "true"}) is None
    assert resolve(TelemetrySettings("http://d:4317"), {"OTEL_TRACES_EXPORTER": "none"}) is None
    off = resolve(TelemetrySettings("http://d:4317"), {"OTEL_TRACES_SAMPLER": "always_off"})
    assert off is not None and off.ratio == 0.0
    with pytest.raises(ValueError, match="not supported"):
        resolve(
            TelemetrySettings(),
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "x", **{"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}},
        )


async def test_reasoning_capture_is_opt_in_redacted_and_bounded(
    make_proxy: ProxyFactory,
    keys: Keys,
    llm_upstream: LlmUpstream,
    collector: Received,
    tmp_path: Path,
) -> None:
    (tmp_path / "hmac").write_bytes(b"audit-hmac-key\n")
    policy = POLICY.replace('"llm:chat/**"', '"llm:chat/**", "llm:messages/**"')
    proxy = await make_proxy(
        policy=policy,
        upstream_url=llm_upstream.url,
        upstream_extra="    protocol: llm",
        extra=telemetry(collector, capture_messages="true", max_message_bytes=300)
        + f"audit: {{hmac_key_file: {tmp_path / 'hmac'}, redact: [args.messages.content]}}\n",
    )
    token = keys.token("writer")
    client = openai.AsyncOpenAI(base_url=proxy.base + "/v1", api_key=token, max_retries=0)
    async with client:
        await client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "patient 4711 has the flu"}],
        )
    claude = anthropic.AsyncAnthropic(base_url=proxy.base, api_key=token, max_retries=0)
    async with (
        claude,
        claude.messages.stream(
            model="claude-sonnet-4",
            max_tokens=100,
            system="You are terse. " * 40,
            messages=[{"role": "user", "content": "hello"}],
        ) as stream,
    ):
        async for _ in stream:
            pass
    spans = await collector.wait(8)
    chat, messages = sorted(
        (s for s in spans if s.kind == 2), key=lambda s: s.attributes["gen_ai.operation.name"]
    )
    sent = orjson.loads(chat.attributes["gen_ai.input.messages"])
    assert sent[0]["role"] == "user"
    assert sent[0]["content"].startswith("hmac-sha256:")  # the trail's redaction
    answer = orjson.loads(chat.attributes["gen_ai.output.messages"])
    assert answer == [{"role": "assistant", "parts": [{"type": "text", "content": REPLY_TEXT}]}]
    # Streamed: the deltas joined; a long system prompt cut at the bound, and said so.
    streamed = orjson.loads(messages.attributes["gen_ai.output.messages"])
    assert streamed[0]["parts"][0]["content"] == REPLY_TEXT
    system = messages.attributes["gen_ai.system_instructions"]
    assert system.endswith("…[truncated]") and len(system.encode()) <= 300
    exported = b"".join(collector.raw)
    assert b"4711" not in exported and token.encode() not in exported


async def test_without_capture_no_message_is_on_the_span(
    make_proxy: ProxyFactory, keys: Keys, llm_upstream: LlmUpstream, collector: Received
) -> None:
    proxy = await make_proxy(
        policy=POLICY,
        upstream_url=llm_upstream.url,
        upstream_extra="    protocol: llm",
        extra=telemetry(collector),
    )
    client = openai.AsyncOpenAI(
        base_url=proxy.base + "/v1", api_key=keys.token("writer"), max_retries=0
    )
    async with client:
        await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hello there"}]
        )
    await collector.wait(4)
    exported = b"".join(collector.raw)
    assert b"hello there" not in exported and REPLY_TEXT.encode() not in exported
    assert not any("gen_ai.input.messages" in s.attributes for s in collector.spans)


def test_run_refuses_an_unsupported_otlp_protocol_clearly(tmp_path: Path, keys: Keys) -> None:
    path = write_config(tmp_path, keys, "http://127.0.0.1:1")
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
    }
    done = subprocess.run(
        [sys.executable, "-m", "agentproxy", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 1
    assert "cannot start: OTLP protocol 'http/json' is not supported" in done.stderr
