"""One agent flooding an MCP upstream with bodies that are costly to read, while another makes
ordinary calls: what the ordinary agent's calls look like meanwhile. Shared by
tests/proxy/test_body_flood.py (does the good agent get through?) and bench/body_flood.py (how
much slower?).

The attacks are those of issue 21: a 58 KB gzip body inflating to 60 MB, a 30 MB JSON body,
and (the worst that the caps still let in) bodies just under `max_body_bytes` packed with
numbers or with empty arrays, each for a tool the attacker may not call.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import io
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parents[2]
HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": "2025-03-26",
}

POLICY = """
default: deny
rules:
  - id: lookups
    agents: [good-agent, "flood-*"]
    actions: ["mcp:tools/call/lookup"]
    effect: allow
"""


def tools_call(tool: str, arguments_json: bytes) -> bytes:
    return (
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"'
        + tool.encode()
        + b'","arguments":'
        + arguments_json
        + b"}}"
    )


GOOD_CALL: bytes = tools_call("lookup", b'{"id":"42"}')


@functools.cache
def attack_bodies(max_body_bytes: int) -> tuple[tuple[bytes, dict[str, str]], ...]:
    """(body, extra headers) of each attack; built once (the bomb takes a while to pack)."""
    pad = b'{"pad":"' + b"0" * 60_000_000 + b'"}'
    bomb = gzip.compress(tools_call("admin_reset", pad), compresslevel=9)
    # Numbers are the strict parser's slowest input: about half a million of them.
    count = (max_body_bytes - 200) // 2
    dense = tools_call("admin_reset", b'{"xs":[' + b"0," * (count - 1) + b"0]}")
    assert len(dense) <= max_body_bytes
    # Empty arrays: nothing in them calls back into Python, the C parser's longest hold.
    arrays = tools_call(
        "admin_reset", b'{"xs":[' + b"[]," * ((max_body_bytes - 200) // 3) + b"[]]}"
    )
    assert len(arrays) <= max_body_bytes
    huge = tools_call("admin_reset", b'{"pad":"' + b"1" * 30_000_000 + b'"}')
    return (
        (bomb, {"Content-Encoding": "gzip"}),
        (dense, {}),
        (arrays, {}),
        (huge, {}),
    )


@dataclass
class Run:
    """The good agent's calls (seconds each, and their statuses) and the attacks' outcomes."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    attacks: Counter[str] = field(default_factory=Counter)


async def good_agent(base: str, token: str, run: Run, stop: asyncio.Event) -> None:
    headers = {**HEADERS, "Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            started = time.perf_counter()
            async with s.post(base + "/mcp", data=GOOD_CALL, headers=headers) as r:
                await r.read()
                run.statuses[r.status] += 1
            run.latencies.append(time.perf_counter() - started)


async def attacker(
    base: str,
    token: str,
    bodies: tuple[tuple[bytes, dict[str, str]], ...],
    run: Run,
    stop: asyncio.Event,
) -> None:
    headers = {**HEADERS, "Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            for body, extra in bodies:
                # aiohttp warns about (and blocks its loop on) large bytes; a stream it sends.
                data = io.BytesIO(body) if len(body) > 1 << 20 else body
                try:
                    async with s.post(base + "/mcp", data=data, headers={**headers, **extra}) as r:
                        await r.read()
                        run.attacks[str(r.status)] += 1
                except aiohttp.ClientError:
                    # A 413 on Content-Length closes the connection while the body is sent.
                    run.attacks["closed"] += 1
                if stop.is_set():
                    return


async def attack(base: str, tokens: list[str], max_body_bytes: int, seconds: float) -> Counter[str]:
    """One attacker per token for `seconds`; how each attack body was answered."""
    bodies = attack_bodies(max_body_bytes)
    run = Run()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(attacker(base, t, bodies, run, stop)) for t in tokens]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    return run.attacks


async def measure(
    base: str, good_token: str, attacker_tokens: list[str], max_body_bytes: int, seconds: float
) -> Run:
    """The good agent's calls for `seconds`, with one attacker per token running meanwhile in
    a process of its own, as another agent would (none: the baseline)."""
    run = Run()
    flood = None
    if attacker_tokens:
        flood = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.harness.body_flood",
            base,
            str(max_body_bytes),
            str(seconds + 1.5),
            *attacker_tokens,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,  # where `tests` is a package
        )
        assert flood.stdout is not None
        await flood.stdout.readline()  # "started": its bodies are built, the attack is on
        await asyncio.sleep(0.5)
    stop = asyncio.Event()
    good = asyncio.create_task(good_agent(base, good_token, run, stop))
    await asyncio.sleep(seconds)
    stop.set()
    await good
    if flood is not None:
        out, _ = await flood.communicate()
        run.attacks.update(orjson.loads(out))
    return run


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def _main(base: str, max_body_bytes: int, seconds: float, tokens: list[str]) -> None:
    attack_bodies(max_body_bytes)
    print("started", flush=True)
    outcomes = await attack(base, tokens, max_body_bytes, seconds)
    sys.stdout.buffer.write(orjson.dumps(dict(outcomes)))


if __name__ == "__main__":
    # python -m tests.harness.body_flood BASE MAX_BODY_BYTES SECONDS TOKEN...
    asyncio.run(_main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]))
