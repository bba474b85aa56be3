"""What reading REST bodies and shaping answers costs (issue 22), per KB and per call.

In process: the data plane's own functions on realistic documents (a list of employee
records) of growing size: a JSON body read as args (strict parser), a form body, an OpenAPI
body validated against its schema, and an answer shaped (parsed, keep_items by CEL,
redact_fields, written again); each as microseconds per KB and against orjson.loads of the
same bytes. Through a proxy process: one agent's sequential calls with a body read as args
versus the same body streamed, and an answer shaped versus passed through, as ratios of
p50 in the same run. Not part of the test suite.

    .venv/bin/python bench/bodies.py [--calls 400] [--name bodies]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from common import (
    Issuer,
    Processes,
    agentproxy_config,
    free_port,
    machine,
    start_agentproxy,
    table,
    wait_port,
    write_result,
)

from agentproxy.config.openapi import operations_of
from agentproxy.config.policies import read_policy_file
from agentproxy.core import Action, Facts, Principal
from agentproxy.policy.bodies import answer_shape
from agentproxy.policy.compiler import compile_policy
from agentproxy.protocols.http_body import parse_body
from agentproxy.protocols.openapi import BodyValidator
from agentproxy.protocols.strict_json import parse_answer

POLICY = """
default: deny
rules:
  - id: reads-body
    agents: [bench]
    actions: ["http:POST /v1/read"]
    when: 'size(args.items) < 100000'
    effect: allow
  - id: streams-body
    agents: [bench]
    actions: ["http:POST /v1/stream"]
    effect: allow
  - id: plain-answer
    agents: [bench]
    actions: ["http:GET /v1/plain"]
    effect: allow
  - id: shaped-answer
    agents: [bench]
    users: ["*"]
    actions: ["http:GET /v1/shaped"]
    effect: allow
    obligations:
      keep_items: {path: items, when: 'item.manager == principal.user'}
      redact_fields: ["items[].salary", "items[].ssn"]
"""

SPEC = {
    "openapi": "3.1.0",
    "paths": {
        "/v1/read": {
            "post": {
                "operationId": "read",
                "requestBody": {
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "items": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": {
                                                k: {"type": "string"}
                                                for k in ("id", "name", "manager", "ssn", "title")
                                            }
                                            | {"salary": {"type": "integer"}},
                                        },
                                    }
                                },
                            }
                        }
                    }
                },
            }
        }
    },
}


def records(kib: int) -> dict[str, Any]:
    """A directory answer of about `kib` KiB."""
    item = {
        "id": "00042",
        "name": "Grace Hopper",
        "manager": "alice",
        "title": "Engineer",
        "salary": 150000,
        "ssn": "123-45-6789",
    }
    per = len(orjson.dumps(item)) + 1
    count = max(1, kib * 1024 // per)
    return {
        "items": [
            {**item, "id": f"{i:05d}", "manager": "alice" if i % 3 else "bob"} for i in range(count)
        ]
    }


def per_kb(work: Callable[[], Any], size: int, repeat: int) -> float:
    """Median microseconds per KB of `work` over `repeat` runs (a warm-up first)."""
    work()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6 / (size / 1024)


def in_process() -> list[list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        path.write_text(POLICY)
        policy = compile_policy([read_policy_file(path, [])])
    principal = Principal(agent="bench", acting_for="alice")
    action = Action("http", "GET", "/v1/shaped", name="http:GET /v1/shaped")
    shape = answer_shape(policy, action, principal, Facts(), time.time())
    assert shape is not None
    (operation,) = operations_of(SPEC)
    validator = BodyValidator(operation)
    rows = []
    for kib in (1, 16, 256, 1024):
        raw = orjson.dumps(records(kib))
        form = b"&".join(b"f%d=%s" % (i, b"v" * 20) for i in range(min(kib * 40, 999)))
        repeat = 200 if kib <= 16 else 10
        baseline = per_kb(lambda raw=raw: orjson.loads(raw), len(raw), repeat)
        read = per_kb(
            lambda raw=raw: parse_body("json", None, raw, max_bytes=1 << 30), len(raw), repeat
        )

        def validate(raw: bytes = raw) -> None:
            validator.check(parse_body("json", None, raw, max_bytes=1 << 30).args)

        validated = per_kb(validate, len(raw), max(3, repeat // 4))

        def shaped(raw: bytes = raw) -> bytes:
            document = parse_answer(raw)
            shape.apply(document)
            return orjson.dumps(document)

        shaping = per_kb(shaped, len(raw), repeat)
        form_cost = per_kb(
            lambda form=form: parse_body("form", None, form, max_bytes=1 << 30), len(form), repeat
        )
        rows.append(
            [
                f"{len(raw) / 1024:.0f}",
                f"{baseline:.1f}",
                f"{read:.1f} ({read / baseline:.1f}x)",
                f"{validated:.1f} ({validated / baseline:.0f}x)",
                f"{shaping:.1f} ({shaping / baseline:.1f}x)",
                f"{form_cost:.1f}",
            ]
        )
    return rows


async def upstream(answer: bytes) -> tuple[web.AppRunner, int]:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=answer, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def p50(
    s: aiohttp.ClientSession, method: str, url: str, token: str, body: bytes | None, calls: int
) -> float:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        async with s.request(method, url, data=body, headers=headers) as r:
            await r.read()
            assert r.status == 200, (url, r.status)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def through_proxy(calls: int) -> list[list[str]]:
    answer = orjson.dumps(records(64))
    runner, port_up = await upstream(answer)
    procs = Processes()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            issuer = Issuer.create(d)
            port, admin = free_port(), free_port()
            config = agentproxy_config(
                d,
                "bodies",
                port=port,
                admin=admin,
                upstreams=f'  - {{name: hr, url: "http://127.0.0.1:{port_up}"}}',
                policy=POLICY,
                decision_log="off",
            )
            proxy = start_agentproxy(procs, config, d / "proxy.log")
            await asyncio.to_thread(wait_port, port, 30.0, proxy)
            base = f"http://127.0.0.1:{port}"
            token = issuer.mint("alice", act={"sub": "bench"})
            async with aiohttp.ClientSession() as s:
                for kib in (1, 16, 256):
                    body = orjson.dumps(records(kib))
                    n = calls if kib < 256 else max(20, calls // 10)
                    await p50(s, "POST", base + "/v1/stream", token, body, 10)
                    streamed = await p50(s, "POST", base + "/v1/stream", token, body, n)
                    read = await p50(s, "POST", base + "/v1/read", token, body, n)
                    rows.append(
                        [
                            f"POST, {len(body) / 1024:.0f} KiB body",
                            f"{streamed * 1000:.2f}",
                            f"{read * 1000:.2f}",
                            f"{read / streamed:.2f}x",
                        ]
                    )
                plain = await p50(s, "GET", base + "/v1/plain", token, None, calls)
                shaped = await p50(s, "GET", base + "/v1/shaped", token, None, calls)
                rows.append(
                    [
                        f"GET, {len(answer) / 1024:.0f} KiB answer",
                        f"{plain * 1000:.2f}",
                        f"{shaped * 1000:.2f}",
                        f"{shaped / plain:.2f}x",
                    ]
                )
    finally:
        procs.stop()
        await runner.cleanup()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--name", default="bodies")
    args = parser.parse_args()
    local = in_process()
    remote = asyncio.run(through_proxy(args.calls))
    text = "\n".join(
        [
            "# Reading REST bodies and shaping answers",
            "",
            machine(),
            "",
            "In process, microseconds per KB (median), and against orjson.loads of the same "
            "bytes. JSON: a list of employee records; form: fields of 20 characters; shaping: "
            "parse, keep_items by CEL (a third dropped), redact two fields per item, write.",
            "",
            table(
                ["KiB", "orjson.loads", "JSON as args", "+ OpenAPI schema", "shaped", "form"],
                local,
                "rrrrrr",
            ),
            "",
            f"Through a proxy process, one agent's sequential calls (p50 ms, {args.calls} "
            "calls each; streamed and passed-through calls are the baseline):",
            "",
            table(["call", "streamed / plain", "read / shaped", "ratio"], remote, "lrrr"),
            "",
        ]
    )
    write_result(args.name, text)


if __name__ == "__main__":
    main()
