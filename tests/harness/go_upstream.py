"""A Go tool server (tests/harness/go_upstream.go, standard library only), built with the
machine's `go` and run on a free port: the upstream whose `encoding/json` reads keys
case-insensitively. `GoUpstream.seen()` is what it decoded, request by request."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

SOURCE = Path(__file__).with_name("go_upstream.go")


def go_available() -> bool:
    return shutil.which("go") is not None


def build(directory: Path, source: Path = SOURCE) -> Path:
    """`go build` of `source` into `directory` (no network: stdlib only). Returns the binary."""
    binary = directory / source.stem
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOPROXY": "off", "CGO_ENABLED": "0"}
    if not any(name in env for name in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
        env["GOCACHE"] = str(directory / "gocache")  # else the user's cache: built stdlib
    subprocess.run(
        ["go", "build", "-o", str(binary), str(source)],
        cwd=directory,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return binary


@dataclass
class GoUpstream:
    url: str

    async def seen(self) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as s, s.get(self.url + "/seen") as r:
            assert r.status == 200
            result: list[dict[str, Any]] = await r.json()
            return result


@asynccontextmanager
async def run(binary: Path) -> AsyncIterator[GoUpstream]:
    process = await asyncio.create_subprocess_exec(
        str(binary), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 20)
        assert line.startswith(b"PORT "), line
        yield GoUpstream(f"http://127.0.0.1:{int(line.split()[1])}")
    finally:
        process.kill()
        await process.wait()
