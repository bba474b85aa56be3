"""The proxy as its own process (`agentproxy run`), and free ports for it."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from pathlib import Path

import aiohttp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin_ports(config: Path) -> tuple[int, int]:
    """Gives a config written by `write_config` fixed free ports (for `agentproxy run` in a
    subprocess, whose ports the test must know); returns (http, admin)."""
    http, admin = free_port(), free_port()
    config.write_text(
        config.read_text().replace(
            'listen: {http: "127.0.0.1:0", admin: "127.0.0.1:0"}',
            f'listen: {{http: "127.0.0.1:{http}", admin: "127.0.0.1:{admin}"}}',
        )
    )
    return http, admin


async def spawn_proxy(config: Path, log: Path, *args: str) -> asyncio.subprocess.Process:
    """`agentproxy run --config CONFIG [ARGS]` as its own process, stderr into `log`."""
    with log.open("wb") as err:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agentproxy",
            "run",
            "--config",
            str(config),
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
        )


async def wait_ready(
    s: aiohttp.ClientSession,
    admin_port: int,
    process: asyncio.subprocess.Process,
    log: Path,
    within: float = 20.0,
) -> None:
    """Until the proxy process answers /readyz; fails with its log if it exits first."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.returncode is not None:
            tail = await asyncio.to_thread(log.read_text)
            raise AssertionError(f"proxy exited: {tail[-2000:]}")
        try:
            async with s.get(f"http://127.0.0.1:{admin_port}/readyz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("proxy did not become ready")
