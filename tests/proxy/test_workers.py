"""`--workers N`: processes sharing the ports, metrics summed across them."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp

from tests.conftest import Keys, Upstream, write_config
from tests.harness.processes import pin_ports, spawn_proxy, wait_ready


def requests_total(text: str) -> float:
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("agentproxy_requests_total{")
    )


async def test_two_workers_share_ports_and_metrics(
    tmp_path: Path, keys: Keys, upstream: Upstream, redis_url: str
) -> None:
    config = write_config(
        tmp_path,
        keys,
        upstream.url,
        extra=f"store: {{redis: {{url: '{redis_url}'}}}}",
        decision_log="off",
    )
    http_port, admin_port = pin_ports(config)
    log = tmp_path / "workers.log"
    proc = await spawn_proxy(config, log, "--workers", "2")
    headers = {"Authorization": f"Bearer {keys.token()}"}
    try:
        async with aiohttp.ClientSession() as s:
            await wait_ready(s, admin_port, proc, log)
            await asyncio.sleep(1.0)  # let the second worker bind too
            # new connections each time, so the kernel spreads them over both workers
            for _ in range(40):
                async with (
                    aiohttp.ClientSession() as one,
                    one.get(f"http://127.0.0.1:{http_port}/v1/employees/42", headers=headers) as r,
                ):
                    assert r.status == 200
            children_file = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            children = (await asyncio.to_thread(children_file.read_text)).split()
            assert len(children) == 2
            for _ in range(10):
                async with (
                    aiohttp.ClientSession() as one,
                    one.get(f"http://127.0.0.1:{admin_port}/metrics") as r,
                ):
                    text = await r.text()
                assert requests_total(text) == 40.0  # whichever worker answers, it sums all
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_workers_need_redis(tmp_path: Path, keys: Keys) -> None:
    config = write_config(tmp_path, keys, "http://127.0.0.1:9")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentproxy",
        "run",
        "--config",
        str(config),
        "--workers",
        "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 1
    assert b"--workers 2 needs store.redis" in err
