"""The demo (`make run`) as it ships: its config, policy and HR API, on free ports. It shows the
essay's three sentences as policy: "the agent can read employee records for the requesting
user's direct reports, cannot read salary data, and can update only the fields specified in
this workflow"."""

from __future__ import annotations

import importlib.util
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agentproxy.identity.issue import generate_demo_keypair, mint_token
from agentproxy.proxy.runtime import load_config
from agentproxy.proxy.server import ProxyServer
from tests.conftest import start_app

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"
ISSUER = "https://idp.demo.local"


class Demo:
    def __init__(self, base: str, key: Path) -> None:
        self.base = base
        self.key = key

    def token(self, agent: str, *, user: str | None = None, roles: tuple[str, ...] = ()) -> str:
        return mint_token(
            key_file=self.key,
            issuer=ISSUER,
            audience="agentproxy",
            subject=user or agent,
            actors=(agent,) if user else (),
            roles=roles,
            now=time.time(),
        )

    async def call(self, token: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as s,
            s.request(
                method, self.base + path, json=body, headers={"Authorization": f"Bearer {token}"}
            ) as r,
        ):
            return r.status, await r.json(content_type=None)


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[Demo]:
    copy = tmp_path / "demo"
    shutil.copytree(DEMO, copy, ignore=shutil.ignore_patterns(".keys", "__pycache__"))
    (copy / ".keys").mkdir()
    generate_demo_keypair(copy / ".keys" / "issuer.pem", copy / ".keys" / "issuer.pub.pem")
    spec = importlib.util.spec_from_file_location("demo_upstream", copy / "upstream.py")
    assert spec is not None and spec.loader is not None
    demo_upstream = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_upstream)
    api_key = (copy / "upstream-api-key.txt").read_text().strip()
    # The API verifies context tokens only to show them (never to refuse): a JWKS URL that
    # answers nothing does here.
    app: web.Application = demo_upstream.make_app(api_key, "http://127.0.0.1:1/jwks")
    runner, port = await start_app(app)
    config = (copy / "agentproxy.yaml").read_text()
    config = config.replace('"127.0.0.1:8080"', '"127.0.0.1:0"').replace(
        '"127.0.0.1:9901"', '"127.0.0.1:0"'
    )
    config = config.replace('"http://127.0.0.1:8000"', f'"http://127.0.0.1:{port}"')
    config = config.replace("decision_log: stdout", "decision_log: off")
    (copy / "agentproxy.yaml").write_text(config)
    server = ProxyServer(load_config(copy / "agentproxy.yaml"))
    await server.start()
    try:
        yield Demo(f"http://127.0.0.1:{server.http_port}", copy / ".keys" / "issuer.pem")
    finally:
        await server.stop()
        await runner.cleanup()


async def test_the_demo_shows_the_essays_three_sentences(demo: Demo) -> None:
    # "… employee records for the requesting user's direct reports"
    assistant = demo.token("assistant", user="alice")
    status, got = await demo.call(assistant, "GET", "/v1/employees")
    assert status == 200, got
    assert [e["id"] for e in got["items"]] == ["42", "43"]
    # "… cannot read salary data"
    assert all("salary" not in e for e in got["items"])
    hr = demo.token("hr-bot", roles=("hr",))
    status, got = await demo.call(hr, "GET", "/v1/employees/42")
    assert status == 200 and got["employee"]["name"] == "Grace"
    assert "salary" not in got["employee"]
    assert (await demo.call(hr, "GET", "/v1/employees/42/salary"))[0] == 403
    # "… can update only the fields specified in this workflow"
    status, got = await demo.call(hr, "PATCH", "/v1/employees/42", {"title": "Staff Engineer"})
    assert status == 200 and got == {"updated": "42", "changed": ["title"]}
    status, got = await demo.call(
        hr, "PATCH", "/v1/employees/42", {"title": "CTO", "salary": 10**7}
    )
    assert status == 403, got
    status, got = await demo.call(hr, "GET", "/v1/employees/42")
    assert got["employee"]["title"] == "Staff Engineer"


def test_make_run_starts_the_demo_on_other_ports_and_refuses_a_taken_one(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys
    import urllib.request

    from tests.harness.processes import free_port

    ports = {"HTTP_PORT": free_port(), "ADMIN_PORT": free_port(), "TOOL_PORT": free_port()}
    env = {**__import__("os").environ, **{k: str(v) for k, v in ports.items()}}
    demo = subprocess.Popen(
        [sys.executable, str(DEMO / "run.py")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert demo.stdout is not None
        lines = []
        for line in demo.stdout:
            lines.append(line.decode())
            if b"demo is running" in line:
                break
        else:
            raise AssertionError("".join(lines))
        url = f"http://127.0.0.1:{ports['ADMIN_PORT']}/readyz"
        with urllib.request.urlopen(url, timeout=5) as ready:
            assert ready.status == 200
    finally:
        demo.terminate()
        demo.wait(15)
        if demo.stdout is not None:
            demo.stdout.close()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports["HTTP_PORT"]))
        holder.listen()
        refused = subprocess.run(
            [sys.executable, str(DEMO / "run.py")],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert refused.returncode == 1
    assert f"port {ports['HTTP_PORT']} (HTTP_PORT) is taken" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
