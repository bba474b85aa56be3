"""examples/mcp really runs: its server (the official MCP SDK), its config and policy, and its
client (the official SDK client), through the proxy."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agentproxy.identity.issue import generate_demo_keypair, mint_token
from agentproxy.proxy.runtime import load_config
from agentproxy.proxy.server import ProxyServer
from tests.harness.processes import free_port

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mcp"


def load(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def example(tmp_path: Path) -> AsyncIterator[tuple[ProxyServer, Path]]:
    copy = tmp_path / "mcp"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns(".keys", "__pycache__"))
    (copy / ".keys").mkdir()
    generate_demo_keypair(copy / ".keys" / "issuer.pem", copy / ".keys" / "issuer.pub.pem")
    port = free_port()
    config = copy / "agentproxy.yaml"
    text = config.read_text().replace("127.0.0.1:8100", f"127.0.0.1:{port}")
    for fixed in ("8082", "9914"):
        text = text.replace(f"127.0.0.1:{fixed}", "127.0.0.1:0")
    config.write_text(text.replace("decision_log: stdout", "decision_log: off"))
    server = await asyncio.create_subprocess_exec(
        sys.executable, str(copy / "server.py"), "--port", str(port), stdout=asyncio.subprocess.PIPE
    )
    assert server.stdout is not None
    await asyncio.wait_for(server.stdout.readline(), 30)  # "hr MCP server on ..."
    await asyncio.sleep(0.5)  # uvicorn binds after the line
    proxy = ProxyServer(load_config(config), watch_interval=None)
    await proxy.start()
    try:
        yield proxy, copy
    finally:
        await proxy.stop()
        server.terminate()
        await server.wait()


async def test_the_mcp_example_runs_with_the_official_sdk(
    example: tuple[ProxyServer, Path],
) -> None:
    proxy, copy = example
    client = load(copy / "client.py", "mcp_example_client")
    token = mint_token(
        key_file=copy / ".keys" / "issuer.pem",
        issuer="https://idp.demo.local",
        audience="agentproxy",
        subject="hr-bot",
        roles=["hr"],
        now=time.time(),
    )
    for _ in range(50):  # the server may still be binding its port
        try:
            lines = await client.run(f"http://127.0.0.1:{proxy.http_port}/mcp", token)
            break
        except Exception:
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("the example's MCP server never answered")
    assert lines[0] == "tools this agent may call: get_employee, pay_bonus, search_employees"
    assert "Grace" in lines[1]
    assert lines[2] == "pay_bonus 100: paid 100 to employee 42"
    assert lines[3].startswith("pay_bonus: refused (-32004)") and "HR lead" in lines[3]
    assert lines[4].startswith("delete_all: refused (-32003)") and "never delete" in lines[4]
