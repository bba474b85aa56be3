"""What the audit trail costs per call at a steady rate, with and without the writer's linger.

Submits a call's two records (decision and outcome, as the pipeline does) every 1/rate
seconds for a few seconds to a trail writing a file, and reports the process's CPU per call
beyond an empty loop at the same pace, and the mean batch size. `required: true` has no
linger (calls wait for their record); `required: false` lingers `audit.trail.LINGER`.

    .venv/bin/python bench/audit_trail.py [--seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from common import machine, table, write_result

from agentproxy.audit import trail as trail_module
from agentproxy.audit.settings import AuditSettings

RECORD: dict[str, Any] = {
    "kind": "decision",
    "time": "2026-11-25T18:00:00.123456Z",
    "decision_id": "abcdef0123456789abcdef01",
    "trace_id": "0" * 32,
    "principal": {
        "agent": "hr-bot",
        "user": None,
        "chain": [],
        "roles": ["hr"],
        "claims": {"sub": "hr-bot", "dept": "hr"},
        "issuer": "https://idp",
    },
    "action": "http:GET /v1/employees/42",
    "upstream": "tool",
    "resource": {"path": "/v1/employees/42", "query": {}},
    "effect": "allow",
    "rule": "read-employees",
}


async def run(required: bool | None, rate: float, seconds: float) -> tuple[float, float]:
    """CPU µs per call and mean records per batch; `required` None: no trail at all."""
    trail = None
    batches: list[int] = []
    if required is not None:
        d = Path(tempfile.mkdtemp(prefix="ap-audit-bench-"))
        trail = trail_module.AuditTrail(
            AuditSettings(file=d / "audit.jsonl", replica="bench", required=required)
        )
        await trail.start()
        write = trail._write

        async def counting(sealed: list[Any]) -> list[str]:
            batches.append(len(sealed))
            return await write(sealed)

        trail._write = counting  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    calls, cpu, started = 0, time.process_time(), loop.time()
    while loop.time() - started < seconds:
        if trail is not None:
            if required:  # as the pipeline does: a call waits for its decision record
                trail.submit(RECORD)
                trail.post(dict(RECORD))
            else:  # nobody waits: both records are handed over
                trail.post(dict(RECORD))
                trail.post(dict(RECORD))
        calls += 1
        await asyncio.sleep(1 / rate)
    used = time.process_time() - cpu
    if trail is not None:
        await trail.close()
    return used / calls * 1e6, (sum(batches) / len(batches) if batches else 0.0)


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--name", default="audit_trail")
    args = parser.parse_args()
    rows = []
    for rate in (200.0, 1000.0):
        empty, _ = await run(None, rate, args.seconds)
        for required in (True, False):
            cpu, batch = await run(required, rate, args.seconds)
            rows.append(
                [
                    f"{rate:,.0f}/s",
                    "required: true (no linger)"
                    if required
                    else f"required: false (linger {trail_module.LINGER * 1000:g} ms)",
                    f"{cpu - empty:,.0f}",
                    f"{batch:.1f}",
                ]
            )
    text = (
        f"# Audit trail cost per call ({machine()})\n\n"
        "Two records per call (decision, outcome) handed to a trail at a steady pace, as "
        "the pipeline does (`required: true`: the decision record submitted, for its call to "
        "await, every batch written and fsynced in a worker thread; `required: false`: both "
        "posted, batches appended on the loop and fsynced at most once a second); CPU of the "
        "process "
        "beyond an empty loop at the same pace. asyncio.sleep's granularity makes the real "
        "pace lower than the nominal one.\n\n"
        + table(["nominal pace", "trail", "CPU µs/call", "records/batch"], rows, "llrr")
        + "\n"
    )
    write_result(args.name, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
