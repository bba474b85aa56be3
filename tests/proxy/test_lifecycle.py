"""Hot reload from a ConfigMap-style symlink swap, and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson

from agentproxy.proxy.runtime import load_config
from agentproxy.proxy.server import ProxyServer
from tests.conftest import (
    DEFAULT_POLICY,
    Keys,
    Upstream,
    write_config,
)
from tests.harness.processes import pin_ports, spawn_proxy, wait_ready


def configmap_layout(d: Path, generation: str, files: dict[str, str]) -> None:
    """What the kubelet does: write a new timestamped directory, then atomically point
    `..data` at it; the visible files are symlinks through `..data`."""
    target = d / f"..{generation}"
    target.mkdir()
    for name, text in files.items():
        (target / name).write_text(text)
    tmp = d / "..data_tmp"
    tmp.symlink_to(target.name)
    os.replace(tmp, d / "..data")
    for name in files:
        link = d / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")


async def test_configmap_symlink_swap_is_noticed(
    tmp_path: Path, keys: Keys, upstream: Upstream
) -> None:
    base = write_config(tmp_path, keys, upstream.url)  # keys and secrets beside the ConfigMap
    cm = tmp_path / "cm"
    cm.mkdir()
    config_text = base.read_text().replace(
        'policy_files: ["policies/*.yaml"]', 'policy_files: ["main.yaml"]'
    )
    config_text = config_text.replace("issuer.pem", str(tmp_path / "issuer.pem"))
    config_text = config_text.replace("value_file: secret", f"value_file: {tmp_path / 'secret'}")
    configmap_layout(
        cm, "2026_11_25_1", {"agentproxy.yaml": config_text, "main.yaml": DEFAULT_POLICY}
    )
    server = ProxyServer(load_config(cm / "agentproxy.yaml"), watch_interval=0.1)
    await server.start()
    headers = {"Authorization": f"Bearer {keys.token()}"}
    url = f"http://127.0.0.1:{server.http_port}/v1/employees/42"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(url, headers=headers) as r:
                assert r.status == 200
            changed = DEFAULT_POLICY.replace('resource.id != "13"', 'resource.id != "42"')
            await asyncio.to_thread(
                configmap_layout,
                cm,
                "2026_11_25_2",
                {"agentproxy.yaml": config_text, "main.yaml": changed},
            )
            deadline = time.monotonic() + 5
            while True:
                async with s.get(url, headers=headers) as r:
                    if r.status == 403:
                        break
                assert time.monotonic() < deadline, "the swap was not noticed"
                await asyncio.sleep(0.05)
            # a broken update is rejected and the last good policy keeps answering
            await asyncio.to_thread(
                configmap_layout,
                cm,
                "2026_11_25_3",
                {"agentproxy.yaml": config_text, "main.yaml": "rules: [{id: x}]"},
            )
            await asyncio.sleep(0.6)
            async with s.get(url, headers=headers) as r:
                assert r.status == 403
            async with s.get(f"http://127.0.0.1:{server.admin_port}/metrics") as r:
                text = await r.text()
            assert 'agentproxy_policy_reloads_total{result="failure"} 1.0' in text
    finally:
        await server.stop()


APPROVAL_RULE = """
  - id: needs-a-human
    agents: [hr-bot]
    actions: ["http:DELETE /v1/employees/{id}"]
    effect: require_approval
    approval: {approvers: [carol], hold: 50s}
"""


async def test_sigterm_finishes_calls_in_flight_and_the_audit_trail(
    tmp_path: Path, keys: Keys, upstream: Upstream
) -> None:
    """200 calls in flight complete; a call held for approval is answered "pending" at once
    (its approval persists); every call's records reach the audit file, which verifies."""
    audit = tmp_path / "audit"
    audit.mkdir()
    config = write_config(
        tmp_path,
        keys,
        upstream.url,
        policy=DEFAULT_POLICY + APPROVAL_RULE,
        extra=f"audit: {{file: '{audit / 'audit.jsonl'}'}}",
        decision_log="off",
    )
    http_port, admin_port = pin_ports(config)
    log = tmp_path / "proxy.log"
    proc = await spawn_proxy(config, log)
    headers = {"Authorization": f"Bearer {keys.token()}"}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=300)) as s:
            await wait_ready(s, admin_port, proc, log)

            async def call(method: str, path: str) -> int:
                async with s.request(
                    method, f"http://127.0.0.1:{http_port}{path}", headers=headers
                ) as r:
                    await r.read()
                    return r.status

            held = asyncio.ensure_future(call("DELETE", "/v1/employees/9"))
            calls = [asyncio.ensure_future(call("GET", "/slow?s=1")) for _ in range(200)]
            while len(upstream.seen) < 200:  # noqa: ASYNC110 - the fixture records, it does not signal
                await asyncio.sleep(0.02)
            assert not held.done()
            stopped_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            statuses = await asyncio.gather(*calls)
            assert statuses == [200] * 200
            assert await asyncio.wait_for(held, 5) == 403  # pending, not cut off
            assert time.monotonic() - stopped_at < 5
            assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    records = [orjson.loads(line) for line in (audit / "audit.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds.count("outcome") == 200
    assert kinds.count("decision") == 201
    verified = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "agentproxy", "audit", "verify", str(audit / "audit.jsonl")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr


async def test_sighup_at_any_moment_of_start_up_never_kills_the_proxy(
    tmp_path: Path, keys: Keys, upstream: Upstream
) -> None:
    """SIGHUPs from the moment the process exists until it serves, as a config watcher may
    send them: it survives every round, serves, and reloads."""
    import signal

    for round_ in range(4):
        config = write_config(tmp_path, keys, upstream.url, decision_log="off")
        http_port, admin_port = pin_ports(config)
        log = tmp_path / f"proxy-{round_}.log"
        proc = await spawn_proxy(config, log)
        try:
            async with aiohttp.ClientSession() as s:

                async def ready(port: int) -> bool:
                    try:
                        async with s.get(f"http://127.0.0.1:{port}/readyz") as r:
                            return r.status == 200
                    except aiohttp.ClientError:
                        return False

                sent = 0
                # Once the interpreter runs our entry point (it cannot catch a signal before),
                # a signal every few ms: some land in imports, some while the listeners open,
                # some after.
                await asyncio.sleep(0.15)
                while not await ready(admin_port):
                    assert proc.returncode is None, log.read_text()[-2000:]
                    proc.send_signal(signal.SIGHUP)
                    sent += 1
                    await asyncio.sleep(0.003 * (round_ + 1))
                for _ in range(5):
                    proc.send_signal(signal.SIGHUP)
                    await asyncio.sleep(0.05)
                assert sent > 0
                await asyncio.sleep(0.3)
                assert proc.returncode is None, log.read_text()[-2000:]
                headers = {"Authorization": f"Bearer {keys.token()}"}
                url = f"http://127.0.0.1:{http_port}/v1/employees/1"
                async with s.get(url, headers=headers) as r:
                    assert r.status == 200
        finally:
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()
    assert "reload" in log.read_text().lower()
