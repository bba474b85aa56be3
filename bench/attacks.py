"""What each "one agent stalls the others" attack (issue 21) costs a well-behaved agent: its
p99 during the attack over its p99 without, in the same run. Not part of the test suite.

The proxy runs as its own process (default listen bounds). The good agent calls from this
process, one call at a time; the attackers are coroutines here too (each attack is cheap for
its sender, costly only for a proxy that does not bound it):

- patterns: two agents send 6,000-character segments against `*-*-*-*.csv` (a backtracking
  matcher: hours per call);
- idle: 1,100 idle connections held open (aiohttp alone: every agent locked out);
- slow-heads: 200 connections trickling their heads a byte every 50 ms;
- slow-bodies: four uploads trickled a byte every 200 ms to a 2-worker sync gunicorn (before:
  the good agent's calls got 504);
- sighup: SIGHUP every 5 ms (reloads are coalesced).

    .venv/bin/python bench/attacks.py [--seconds 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web
from common import (
    Issuer,
    Processes,
    agentproxy_config,
    free_port,
    machine,
    percentile,
    start_agentproxy,
    table,
    wait_port,
    write_result,
)

POLICY = """
default: deny
rules:
  - id: good
    agents: [good-agent]
    actions: ["http:GET /v1/**", "http:POST /upload"]
    effect: allow
  - id: exports
    agents: ["exporter-*"]
    actions: ["http:GET /files/*-*-*-*.csv", "http:POST /upload"]
    effect: allow
"""

GUNICORN_APP = """
def app(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"got %d bytes" % len(body)]
"""

Attack = Callable[[str, int, Issuer, asyncio.Event], Awaitable[None]]


async def aiohttp_upstream() -> tuple[web.AppRunner, int]:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    runner = web.ServerRunner(web.Server(answer), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


async def good_agent(base: str, token: str, seconds: float, post: bool) -> list[float]:
    """One call at a time for `seconds`; latencies sorted (failures count as 10 s)."""
    headers = {"Authorization": f"Bearer {token}"}
    out: list[float] = []
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        while time.monotonic() < end:
            began = time.monotonic()
            try:
                if post:
                    request = s.post(f"{base}/upload", data=b"y" * 100, headers=headers)
                else:
                    request = s.get(f"{base}/v1/items/1", headers=headers)
                async with request as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            out.append(time.monotonic() - began if ok else 10.0)
    return sorted(out)


async def patterns(base: str, port: int, issuer: Issuer, stop: asyncio.Event) -> None:
    headers = {"Authorization": f"Bearer {issuer.mint('exporter-1')}"}
    async with aiohttp.ClientSession() as s:

        async def one() -> None:
            while not stop.is_set():
                async with s.get(f"{base}/files/{'-' * 6000}", headers=headers) as r:
                    await r.read()

        await asyncio.gather(one(), one())


async def idle(base: str, port: int, issuer: Issuer, stop: asyncio.Event) -> None:
    held = []
    for _ in range(1100):
        with contextlib.suppress(OSError):
            held.append(await asyncio.open_connection("127.0.0.1", port))
    await stop.wait()
    for _, writer in held:
        writer.close()


async def slow_heads(base: str, port: int, issuer: Issuer, stop: asyncio.Event) -> None:
    head = b"GET /v1/items/1 HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000

    async def one() -> None:
        while not stop.is_set():
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                for byte in head:
                    if stop.is_set():
                        break
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.05)
                writer.close()
            except (OSError, RuntimeError):
                await asyncio.sleep(0.05)

    await asyncio.gather(*(one() for _ in range(200)))


async def slow_bodies(base: str, port: int, issuer: Issuer, stop: asyncio.Event) -> None:
    token = issuer.mint("exporter-2").encode()

    async def one(length: int) -> None:
        while not stop.is_set():
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(
                    b"POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                    + token
                    + b"\r\nContent-Length: "
                    + str(length).encode()
                    + b"\r\n\r\n"
                )
                for _ in range(length):
                    if stop.is_set():
                        break
                    writer.write(b"x")
                    await writer.drain()
                    await asyncio.sleep(0.2)
                writer.close()
            except (OSError, RuntimeError):
                await asyncio.sleep(0.1)

    await asyncio.gather(one(200), one(200), one(1_000_000), one(1_000_000))


def sighup(proxy: subprocess.Popen[bytes]) -> Attack:
    async def attack(base: str, port: int, issuer: Issuer, stop: asyncio.Event) -> None:
        while not stop.is_set():
            proxy.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.005)

    return attack


async def measure(
    base: str, port: int, issuer: Issuer, attack: Attack, seconds: float, post: bool
) -> tuple[list[float], list[float]]:
    good = issuer.mint("good-agent")
    quiet = await good_agent(base, good, seconds, post)
    stop = asyncio.Event()
    task = asyncio.ensure_future(attack(base, port, issuer, stop))
    await asyncio.sleep(0.5)  # the attack in place
    attacked = await good_agent(base, good, seconds, post)
    stop.set()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, 15)
    await asyncio.sleep(1.0)
    return quiet, attacked


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


async def main(args: argparse.Namespace) -> None:
    runner, upstream_port = await aiohttp_upstream()
    procs = Processes()
    rows: list[list[str]] = []
    summary: list[list[str]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            (d / "slowapp.py").write_text(GUNICORN_APP)
            gunicorn_port = free_port()
            procs.start(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "--workers",
                    "2",
                    "--worker-class",
                    "sync",
                    "--bind",
                    f"127.0.0.1:{gunicorn_port}",
                    "--chdir",
                    str(d),
                    "slowapp:app",
                ]
            )
            await asyncio.to_thread(wait_port, gunicorn_port, 30.0)
            issuer = Issuer.create(d)
            port, admin = free_port(), free_port()
            config = agentproxy_config(
                d,
                "attacks",
                port=port,
                admin=admin,
                upstreams=(
                    f'  - {{name: gunicorn, url: "http://127.0.0.1:{gunicorn_port}", '
                    "match: {path_prefix: /upload}, timeout: 2s}\n"
                    f'  - {{name: tools, url: "http://127.0.0.1:{upstream_port}"}}'
                ),
                policy=POLICY,
                decision_log="off",
            )
            proxy = start_agentproxy(procs, config, d / "proxy.log")
            await asyncio.to_thread(wait_port, port, 30.0, proxy)
            base = f"http://127.0.0.1:{port}"
            attacks: list[tuple[str, Attack, bool]] = [
                ("patterns", patterns, False),
                ("idle", idle, False),
                ("slow-heads", slow_heads, False),
                ("slow-bodies", slow_bodies, True),
                ("sighup", sighup(proxy), False),
            ]
            for name, attack, post in attacks:
                ratios, worst = [], 0.0
                for round_ in range(1, args.rounds + 1):
                    quiet, attacked = await measure(base, port, issuer, attack, args.seconds, post)
                    q99, a99 = percentile(quiet, 0.99), percentile(attacked, 0.99)
                    ratios.append(a99 / q99)
                    worst = max(worst, a99)
                    failed = sum(1 for x in attacked if x >= 10.0)
                    rows.append(
                        [
                            name,
                            str(round_),
                            str(len(quiet)),
                            ms(q99),
                            str(len(attacked)),
                            str(failed),
                            ms(percentile(attacked, 0.5)),
                            ms(a99),
                        ]
                    )
                summary.append(
                    [
                        name,
                        f"{statistics.median(ratios):.1f}x",
                        ms(worst),
                        "yes" if worst < 1 else "no",
                    ]
                )
                assert proxy.poll() is None, (d / "proxy.log").read_text()[-2000:]
    finally:
        procs.stop()
        await runner.cleanup()
    text = "\n".join(
        [
            "# A well-behaved agent's calls during each attack of issue 21",
            "",
            machine(),
            "",
            f"{args.seconds:g} s rounds, quiet then attacked, {args.rounds} round(s) each; the "
            "proxy with its default listen bounds; the good agent one call at a time.",
            "",
            table(
                ["attack", "p99 during / without", "worst p99 ms", "p99 under 1 s"],
                summary,
                "lrrl",
            ),
            "",
            table(
                [
                    "attack",
                    "round",
                    "quiet calls",
                    "quiet p99 ms",
                    "attacked calls",
                    "failed",
                    "attacked p50 ms",
                    "attacked p99 ms",
                ],
                rows,
                "lrrrrrrr",
            ),
            "",
        ]
    )
    write_result(args.name, text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--name", default="attacks")
    asyncio.run(main(parser.parse_args()))
