"""The OTLP receivers as fixtures: `receiver` is each transport in turn."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.harness.llm_upstream import LlmUpstream, serve_llm_upstream
from tests.telemetry.receiver import Received, grpc_receiver, http_receiver


@pytest.fixture
async def llm_upstream() -> AsyncIterator[LlmUpstream]:
    async with serve_llm_upstream() as upstream:
        yield upstream


@pytest.fixture(params=["grpc", "http/protobuf"])
async def receiver(request: pytest.FixtureRequest) -> AsyncIterator[Received]:
    make = grpc_receiver if request.param == "grpc" else http_receiver
    async for received in make():
        received.protocol = request.param
        yield received


@pytest.fixture
async def collector() -> AsyncIterator[Received]:
    """A gRPC receiver, for tests that need one transport only."""
    async for received in grpc_receiver():
        yield received


def telemetry(received: Received, ratio: float = 1.0, **more: object) -> str:
    """The `telemetry:` section exporting to `received`."""
    extra = "".join(f"  {k}: {v}\n" for k, v in more.items())
    return (
        "telemetry:\n"
        f'  otlp: {{endpoint: "{received.endpoint}", protocol: {received.protocol}}}\n'
        f"  sample_ratio: {ratio}\n" + extra
    )
