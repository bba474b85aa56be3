"""Load at the official OpenAI Python SDK's own request pattern: N concurrent loops of
`AsyncOpenAI(...).chat.completions.create(...)` for a fixed time, one client (its httpx pool),
as an application using the SDK sends them. Closed loop: each loop awaits its answer before
it sends again.

    python bench/openai_load.py http://127.0.0.1:8080/v1 --api-key TOKEN \
        --concurrency 16 --seconds 8 [--cpu-pid PID ...]

Prints one JSON object: calls, seconds, rps, p50, p90, p99 (ms), errors, the load process's
own CPU seconds in the measured window (`load_cpu_s`) and, for each `--cpu-pid`, that
process's (`cpu_s`, a list in the same order). A short warm-up (connections opened, the SDK's first-call work done) is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from common import cpu_seconds, percentile
from openai import AsyncOpenAI

MODEL = "gpt-4o-mini"


async def loop(
    client: AsyncOpenAI, until: float, latencies: list[float], errors: list[str]
) -> None:
    """Calls until `until`; a failed call or a wrong answer is counted, never retried."""
    while time.perf_counter() < until:
        start = time.perf_counter()
        try:
            answer = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Say hello."}]
            )
        except Exception as exc:  # every failure is counted, by its type
            errors.append(type(exc).__name__)
            continue
        if answer.usage is None or not answer.choices[0].message.content:
            errors.append("no usage or content")
            continue
        latencies.append(time.perf_counter() - start)


async def run(args: argparse.Namespace) -> dict[str, object]:
    # max_retries=0: a retried call would hide a failure inside a slow success.
    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    async with client:
        warm: list[float] = []
        warm_errors: list[str] = []
        until = time.perf_counter() + args.warmup
        await asyncio.gather(
            *(loop(client, until, warm, warm_errors) for _ in range(args.concurrency))
        )
        latencies: list[float] = []
        errors: list[str] = []
        own_before = cpu_seconds(os.getpid())
        before = [cpu_seconds(pid) for pid in args.cpu_pid]
        start = time.perf_counter()
        until = start + args.seconds
        await asyncio.gather(
            *(loop(client, until, latencies, errors) for _ in range(args.concurrency))
        )
        elapsed = time.perf_counter() - start
        after = [cpu_seconds(pid) for pid in args.cpu_pid]
        own_after = cpu_seconds(os.getpid())
    latencies.sort()
    return {
        "calls": len(latencies),
        "seconds": elapsed,
        "rps": len(latencies) / elapsed,
        "p50": percentile(latencies, 0.50) * 1000,
        "p90": percentile(latencies, 0.90) * 1000,
        "p99": percentile(latencies, 0.99) * 1000,
        "errors": len(errors) + len(warm_errors),
        "error_kinds": sorted(set(errors + warm_errors)),
        "load_cpu_s": own_after - own_before,
        "cpu_s": [a - b for a, b in zip(after, before, strict=True)],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("base_url")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--cpu-pid", type=int, action="append", default=[])
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
