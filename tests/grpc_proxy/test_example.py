"""examples/grpc really runs: its service, its config and its policy, through the proxy."""

from __future__ import annotations

import asyncio
import importlib
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from agentproxy.identity.issue import generate_demo_keypair, mint_token
from agentproxy.proxy.runtime import load_config
from agentproxy.proxy.server import ProxyServer
from tests.harness.processes import free_port

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpc"


@pytest.fixture
async def example(tmp_path: Path) -> AsyncIterator[tuple[ProxyServer, Path]]:
    copy = tmp_path / "grpc"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns(".keys", "__pycache__"))
    (copy / ".keys").mkdir()
    generate_demo_keypair(copy / ".keys" / "issuer.pem", copy / ".keys" / "issuer.pub.pem")
    port = free_port()
    config = copy / "agentproxy.yaml"
    text = config.read_text().replace("127.0.0.1:50061", f"127.0.0.1:{port}")
    for fixed in ("8081", "9911", "50051", "9912"):
        text = text.replace(f"127.0.0.1:{fixed}", "127.0.0.1:0")
    config.write_text(text)
    upstream = await asyncio.create_subprocess_exec(
        sys.executable,
        str(copy / "upstream.py"),
        "--port",
        str(port),
        stdout=asyncio.subprocess.PIPE,
    )
    assert upstream.stdout is not None
    await asyncio.wait_for(upstream.stdout.readline(), 30)  # "hr gRPC service on ..."
    server = ProxyServer(load_config(config), watch_interval=None)
    await server.start()
    try:
        yield server, copy
    finally:
        await server.stop()
        upstream.terminate()
        await upstream.wait()


async def test_the_grpc_example_runs(example: tuple[ProxyServer, Path]) -> None:
    server, copy = example
    sys.path.insert(0, str(copy))
    try:
        upstream_module = importlib.import_module("upstream")
        pb2, pb2_grpc = upstream_module.generate()
    finally:
        sys.path.remove(str(copy))
        sys.modules.pop("upstream", None)
    token = mint_token(
        key_file=copy / ".keys" / "issuer.pem",
        issuer="https://idp.demo.local",
        audience="agentproxy",
        subject="hr-bot",
        roles=["hr"],
        now=time.time(),
    )
    md = (("authorization", f"Bearer {token}"),)
    async with aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub: Any = pb2_grpc.EmployeesStub(channel)
        assert (await stub.Get(pb2.GetEmployeeRequest(id="42"), metadata=md)).name == "Grace"
        assert len([e async for e in stub.Watch(pb2.WatchRequest(), metadata=md)]) == 3
        raised = await stub.Raise(
            pb2.RaiseRequest(id="42", percent=3, reason="review"), metadata=md
        )
        assert raised.salary_band == 6
        for request, code in (
            (
                stub.Get(pb2.GetEmployeeRequest(id="1"), metadata=md),
                grpc.StatusCode.PERMISSION_DENIED,
            ),
            (
                stub.Raise(pb2.RaiseRequest(id="42", percent=20, reason="x"), metadata=md),
                grpc.StatusCode.FAILED_PRECONDITION,
            ),
            (stub.Get(pb2.GetEmployeeRequest(id="42")), grpc.StatusCode.UNAUTHENTICATED),
        ):
            with pytest.raises(aio.AioRpcError) as caught:
                await request
            assert caught.value.code() is code
