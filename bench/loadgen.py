"""An open-loop HTTP/1.1 load generator: requests at a fixed rate, latency percentiles as JSON.

wrk is closed-loop: each connection waits for an answer before it sends again, so a stalled
server is sent less and its stall is hidden ("coordinated omission"). Here a scheduler
releases request i at start + (i+1)/rate whatever the answers do; a pool of keep-alive
connections sends them; a request that finds every connection busy waits in the queue, and
that wait is part of its latency (measured from its release, not from when a connection
took it). How late requests were released is reported as `lag_p99`, so a loaded load
generator shows itself.

The scheduler is a kernel interval timer (timerfd) the event loop watches. The loop's own
timers count whole milliseconds: asked to sleep 0.36 ms (2,800/s), uvloop's wakes at once, so
pacing with them either spins, taking a whole core from the contenders on a small machine,
or releases requests in bursts every one or two milliseconds, which is not a fixed rate.

    python bench/loadgen.py http://127.0.0.1:8080/v1/x --rate 2000 --seconds 10 \
        --header "Authorization: Bearer ..."

Prints one JSON object: rate, achieved, p50, p90, p99, p999, max (ms), errors, lag_p99 (ms).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import sys
import time
from urllib.parse import urlsplit

import uvloop

_CLOCK_MONOTONIC = 1  # time.perf_counter's clock on Linux
_TFD_FLAGS = os.O_NONBLOCK | os.O_CLOEXEC  # TFD_NONBLOCK, TFD_CLOEXEC have the same values


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def interval_timer(interval: float) -> int:
    """A non-blocking timerfd expiring every `interval` seconds from now (first: after one).

    Reading it gives the number of expirations since the last read (8 bytes, native order).
    Raises OSError where timerfd is missing (Linux only, as the rest of bench/ is).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_FLAGS)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "timerfd_create")
    ns = max(1, round(interval * 1e9))
    period = _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)
    if libc.timerfd_settime(fd, 0, ctypes.byref(_Itimerspec(period, period)), None) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, "timerfd_settime")
    return fd


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Reads one whole response (Content-Length or chunked); returns its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        lname = name.strip().lower()
        if lname == b"content-length":
            length = int(value)
        elif lname == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


async def run(
    url: str, rate: float, seconds: float, connections: int, headers: list[str], body: bytes
) -> dict[str, float]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    method = "POST" if body else "GET"
    head = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", *headers]
    if body:
        head.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body

    total = int(rate * seconds)
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[float] = []
    lags: list[float] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        while True:
            released = await queue.get()
            if released is None:
                break
            try:
                writer.write(request)
                status = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            latencies.append(time.perf_counter() - released)
            if not 200 <= status < 300:
                errors += 1
        writer.close()

    workers = [asyncio.ensure_future(worker()) for _ in range(connections)]
    await asyncio.sleep(0.2)  # connections open before the clock starts
    loop = asyncio.get_running_loop()
    interval = 1.0 / rate
    sent = 0
    released = loop.create_future()

    def release() -> None:
        nonlocal sent
        try:
            expired = int.from_bytes(os.read(timer, 8), sys.byteorder)
        except BlockingIOError:
            return
        now = time.perf_counter()
        # Every request that is due goes: a late wake-up never thins out the load.
        for _ in range(min(expired, total - sent)):
            lags.append(now - (start + (sent + 1) * interval))
            queue.put_nowait(now)
            sent += 1
        if sent >= total and not released.done():
            released.set_result(None)

    start = time.perf_counter()
    timer = interval_timer(interval)
    try:
        loop.add_reader(timer, release)
        await released
    finally:
        loop.remove_reader(timer)
        os.close(timer)
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.wait_for(asyncio.gather(*workers), timeout=seconds + 60)
    elapsed = time.perf_counter() - start
    latencies.sort()
    lags.sort()
    ms = [x * 1000 for x in latencies]
    return {
        "rate": rate,
        "achieved": len(latencies) / elapsed,
        "p50": _percentile(ms, 0.50),
        "p90": _percentile(ms, 0.90),
        "p99": _percentile(ms, 0.99),
        "p999": _percentile(ms, 0.999),
        "max": ms[-1] if ms else float("nan"),
        "errors": errors,
        "lag_p99": _percentile(lags, 0.99) * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--header", action="append", default=[], help='"Name: value"')
    parser.add_argument("--body", default="", help="a POST body (default: GET)")
    args = parser.parse_args()
    result = uvloop.run(
        run(
            args.url,
            args.rate,
            args.seconds,
            args.connections,
            args.header,
            args.body.encode(),
        )
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
