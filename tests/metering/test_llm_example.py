"""examples/llm really runs: its stand-in provider, its config and policy, and its client (the
official OpenAI and Anthropic SDKs, the agent's token as their api_key), through the proxy."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agentproxy.identity.issue import generate_demo_keypair, mint_token
from agentproxy.proxy.runtime import load_config
from agentproxy.proxy.server import ProxyServer
from tests.harness.processes import free_port
from tests.mcp.test_example import load

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "llm"


@pytest.fixture
async def example(tmp_path: Path) -> AsyncIterator[tuple[ProxyServer, Path]]:
    copy = tmp_path / "llm"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns(".keys", "__pycache__"))
    (copy / ".keys").mkdir()
    generate_demo_keypair(copy / ".keys" / "issuer.pem", copy / ".keys" / "issuer.pub.pem")
    port = free_port()
    config = copy / "agentproxy.yaml"
    text = config.read_text().replace("127.0.0.1:8200", f"127.0.0.1:{port}")
    for fixed in ("8083", "9915"):
        text = text.replace(f"127.0.0.1:{fixed}", "127.0.0.1:0")
    config.write_text(text.replace("decision_log: stdout", "decision_log: off"))
    provider = await asyncio.create_subprocess_exec(
        sys.executable,
        str(copy / "provider.py"),
        "--port",
        str(port),
        stdout=asyncio.subprocess.PIPE,
    )
    assert provider.stdout is not None
    await asyncio.wait_for(provider.stdout.readline(), 30)
    proxy = ProxyServer(load_config(config), watch_interval=None)
    await proxy.start()
    try:
        yield proxy, copy
    finally:
        await proxy.stop()
        provider.terminate()
        await provider.wait()


async def test_the_llm_example_runs_with_the_official_sdks(
    example: tuple[ProxyServer, Path],
) -> None:
    proxy, copy = example
    client = load(copy / "client.py", "llm_example_client")
    token = mint_token(
        key_file=copy / ".keys" / "issuer.pem",
        issuer="https://idp.demo.local",
        audience="agentproxy",
        subject="writer",
        now=time.time(),
    )
    base = f"http://127.0.0.1:{proxy.http_port}"
    for _ in range(50):  # the provider may still be binding its port
        try:
            lines = await asyncio.to_thread(client.run, base, token)
            break
        except Exception:
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("the example's provider never answered")
    assert lines[0] == "openai: hello from the stand-in"
    assert lines[1].startswith("openai, 5000 tokens: refused: no rule allows")
    assert lines[2] == "anthropic: hello from the stand-in"
