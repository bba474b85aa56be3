"""Fixtures for metering tests: a real LLM provider stand-in and a real Prometheus."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.harness.llm_upstream import LlmUpstream, serve_llm_upstream
from tests.harness.prometheus import Prometheus

PrometheusFactory = Callable[[str], Awaitable[Prometheus]]


@pytest.fixture
async def llm_upstream() -> AsyncIterator[LlmUpstream]:
    """The OpenAI/Anthropic-speaking upstream on a free port; see `tests/harness/llm_upstream`."""
    async with serve_llm_upstream() as upstream:
        yield upstream


@pytest.fixture
async def make_prometheus(tmp_path: Path) -> AsyncIterator[PrometheusFactory]:
    """`await make_prometheus("127.0.0.1:9901")`: a real Prometheus scraping that target's
    /metrics every second, stopped at teardown. Fails (never skips) without /usr/bin/prometheus."""
    running: list[Prometheus] = []

    async def factory(target: str) -> Prometheus:
        prometheus = await Prometheus.start(target, tmp_path / f"prometheus{len(running)}")
        running.append(prometheus)
        return prometheus

    try:
        yield factory
    finally:
        for prometheus in running:
            await prometheus.stop()
