"""REST bodies under policy (issue 22): JSON and form bodies are `args`, approvals bind them,
and answers are shaped by the allowing rules' obligations. A real Starlette API stands behind
a real proxy; each test asserts what the API received and what the agent got back."""

from __future__ import annotations

import asyncio
import gzip
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from agentproxy.config.yamldoc import ConfigError
from tests.conftest import Keys, ProxyFactory
from tests.harness.processes import free_port
from tests.proxy.conftest import captured, log_records, raw_request

POLICY = """
default: deny
rules:
  - id: small-transfers
    agents: [payer]
    actions: ["http:POST /v1/transfers"]
    when: 'args.amount <= 100'
    effect: allow
  - id: large-transfers
    agents: [payer]
    actions: ["http:POST /v1/transfers"]
    when: 'args.amount > 100'
    effect: require_approval
    approval: {approvers: ["user:carol"], hold: 0s, timeout: 1h}
  - id: form-transfers
    agents: [payer]
    actions: ["http:POST /v1/form-transfers"]
    when: 'int(args.amount) <= 100'
    effect: allow
  - id: no-role-changes
    agents: ["*"]
    actions: ["http:PATCH /v1/employees/{id}"]
    when: 'has(args.role)'
    effect: deny
    reason: agents never change roles
  - id: workflow-fields
    agents: [hr-bot]
    actions: ["http:PATCH /v1/employees/{id}"]
    when: 'args.all(k, k in ["title", "phone"])'
    effect: allow
  - id: uploads
    agents: ["*"]
    actions: ["http:POST /v1/files"]
    effect: allow
  - id: broad-reads
    agents: [hr-bot]
    actions: ["http:GET /v1/**"]
    effect: allow
  - id: employee-reads
    agents: [hr-bot]
    actions: ["http:GET /v1/employees", "http:GET /v1/employees/{id}", "http:GET /v1/shaped/**"]
    effect: allow
    obligations:
      redact_fields: ["salary", "items[].salary", "items[].ssn"]
      keep_items: {path: items, when: 'item.manager == principal.user'}
"""

EMPLOYEES = [
    {"id": "1", "manager": "alice", "salary": 100, "ssn": "111-11-1111", "name": "Ann"},
    {"id": "2", "manager": "bob", "salary": 200, "ssn": "222-22-2222", "name": "Ben"},
    {"id": "3", "manager": "alice", "salary": 300, "ssn": "333-33-3333", "name": "Cid"},
]


@dataclass
class Api:
    url: str
    bodies: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)

    def last(self) -> tuple[str, bytes, dict[str, str]]:
        return self.bodies[-1]


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    port = free_port()
    state = Api(f"http://127.0.0.1:{port}")

    async def record(request: Request) -> bytes:
        body = await request.body()
        state.bodies.append((request.url.path, body, dict(request.headers)))
        return body

    async def echo(request: Request) -> Response:
        body = await record(request)
        return JSONResponse({"received": len(body)})

    async def employees(request: Request) -> Response:
        await record(request)
        return JSONResponse({"items": EMPLOYEES, "total": 3})

    async def employee(request: Request) -> Response:
        await record(request)
        return JSONResponse({"id": request.path_params["id"], "salary": 5, "name": "Ann"})

    async def shaped(request: Request) -> Response:
        await record(request)
        kind = request.path_params["kind"]
        if kind == "text":
            return PlainTextResponse("salary: 100")
        if kind == "wrong":
            return JSONResponse({"items": {"salary": 100}})
        if kind == "big":
            return JSONResponse({"items": [{"manager": "alice", "pad": "x" * 1000}] * 200})
        if kind == "gzip":
            raw = gzip.compress(orjson.dumps({"items": EMPLOYEES}))
            return Response(
                raw, media_type="application/json", headers={"Content-Encoding": "gzip"}
            )
        if kind == "duplicate":
            return Response(b'{"salary": 1, "salary": 2}', media_type="application/json")
        if kind == "empty":
            return Response(status_code=204)
        return JSONResponse({"items": EMPLOYEES}, status_code=404 if kind == "error" else 200)

    app = Starlette(
        routes=[
            Route("/v1/transfers", echo, methods=["POST"]),
            Route("/v1/form-transfers", echo, methods=["POST"]),
            Route("/v1/files", echo, methods=["POST"]),
            Route("/v1/employees", employees, methods=["GET"]),
            Route("/v1/employees/{id}", employee, methods=["GET"]),
            Route("/v1/employees/{id}", echo, methods=["PATCH"]),
            Route("/v1/shaped/{kind}", shaped, methods=["GET"]),
        ]
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for this
        await asyncio.sleep(0.02)
    try:
        yield state
    finally:
        server.should_exit = True
        await task


def auth(token: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}


JSON = "application/json"


async def send(
    base: str,
    token: str,
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str | None = JSON,
    **headers: str,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    extra = dict(headers)
    if content_type is not None:
        extra["Content-Type"] = content_type
    async with (
        aiohttp.ClientSession() as s,
        s.request(
            method,
            base + path,
            data=body,
            headers=auth(token, **extra),
            skip_auto_headers=["Content-Type"],
        ) as r,
    ):
        raw = await r.read()
        try:
            parsed = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            parsed = {"_text": raw.decode()}
        return r.status, parsed, dict(r.headers)


async def test_json_bodies_are_decided_on_and_forwarded_byte_for_byte(
    make_proxy: ProxyFactory, api: Api, keys: Keys
) -> None:
    proxy = await make_proxy(policy=POLICY, upstream_url=api.url)
    token = keys.token("payer")
    body = b'{"amount": 50, "to": "DE89 3704"}'
    status, got, _ = await send(proxy.base, token, "POST", "/v1/transfers", body)
    assert status == 200, got
    assert api.last()[1] == body
    # Five million is not fifty: the approval rule, not the allow, decides it.
    status, got, _ = await send(proxy.base, token, "POST", "/v1/transfers", b'{"amount": 5000000}')
    assert status == 403 and got["approval_id"], got
    assert len(api.bodies) == 1

    # A body sent in pieces (chunked, no Content-Length) is the same body.
    async def pieces() -> AsyncIterator[bytes]:
        yield b'{"amount": '
        yield b"70}"

    async with (
        aiohttp.ClientSession() as s,
        s.post(
            proxy.base + "/v1/transfers",
            data=pieces(),
            headers=auth(token, **{"Content-Type": JSON}),
        ) as r,
    ):
        assert r.status == 200, await r.text()
    assert api.last()[1] == b'{"amount": 70}'


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'{"amount": 5, "amount": 5000000}', "duplicate key"),
        (b'{"amount": 5, "Amount": 5000000}', "one key to a parser"),
        (b'{"amount": NaN}', "NaN"),
        (b'{"amount": 1e400}', "out of range"),
        (b'{"amount": 5', "JSON body"),
        (b"\xef\xbb\xbf" + b'{"amount": 5}', "byte order mark"),
        (b"[" * 100 + b"]" * 100, "nesting"),
    ],
)
async def test_bodies_parsers_could_read_differently_are_refused(
    make_proxy: ProxyFactory, api: Api, keys: Keys, body: bytes, detail: str
) -> None:
    proxy = await make_proxy(policy=POLICY, upstream_url=api.url)
    status, got, headers = await send(
        proxy.base, keys.token("payer"), "POST", "/v1/transfers", body
    )
    assert status == 400, got
    assert headers["Content-Type"] == "application/problem+json"
    assert detail in got["detail"], got
    assert api.bodies == []


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "multipart/form-data; boundary=x", "application/xml"]
)
async def test_a_body_a_rule_reads_in_another_media_type_is_415_not_forwarded(
    make_proxy: ProxyFactory, api: Api, keys: Keys, content_type: str | None
) -> None:
    # Starlette's request.json() reads the body whatever its Content-Type: a rule that read
    # nothing would let five million through as "text/plain".
    proxy = await make_proxy(policy=POLICY, upstream_url=api.url)
    status, got, _ = await send(
        proxy.base,
        keys.token("payer"),
        "POST",
        "/v1/transfers",
        b'{"amount": 5000000}',
        content_type=content_type,
    )
    assert status == 415, got
    assert "rule" in got["detail"] and "application/json" in got["detail"]
    assert api.bodies == []


async def test_other_charsets_and_two_content_types_are_refused(
    make_proxy: ProxyFactory, api: Api, keys: Keys
) -> None:
    proxy = await make_proxy(policy=POLICY, upstream_url=api.url)
    token = keys.token("payer")
    status, got, _ = await send(
        proxy.base,
        token,
        "POST",
        "/v1/transfers",
        b'{"amount": 5}',
        content_type="application/json; charset=utf-16",
    )
    assert status == 400 and "charset" in got["detail"]
    reply = await raw_request(
        proxy.base,
        "POST",
        "/v1/transfers",
        [
            ("Authorization", f"Bearer {token}"),
            ("Content-Type", JSON),
            ("Content_Type", "text/plain"),  # the same header to a WSGI or CGI server
        ],
        b'{"amount": 5}',
    )
    assert reply.status == 400 and "more than one Content-Type" in reply.json()["detail"]
    assert api.bodies == []


async def test_gzip_bodies_are_decided_decoded_and_sent_decoded(
    make_proxy: ProxyFactory, api: Api, keys: Keys
) -> None:
    proxy = await make_proxy(policy=POLICY, upstream_url=api.url)
    token = keys.token("payer")
    body = b'{"amount": 5000000}'
    status, got, _ = await send(
        proxy.base,
        token,
        "POST",
        "/v1/transfers",
        gzip.compress(body),
        **{"Content-Encoding": "gzip"},
    )
    assert status == 403 and got["approval_id"]  # decided on what it decodes to
    status, _, _ = await send(
        proxy.base,
        token,
        "POST",
        "/v1/transfers",
        gzip.compress(b'{"amount": 9}'),
        **{"Content-Encoding": "gzip"},
    )
    assert status == 200
    _path, received, headers = api.last()
    assert received == b'{"amount": 9}' and "content-encoding" not in headers


async def test_form_bodies_are_args_and_ambiguous_forms_are_refused(
    make_proxy: ProxyFactory, api: Api, keys: Keys
) -> None:
    proxy = await make_proxy(policy=POLICY, upstream_url=api.url)
    token = keys.token("payer")
    form = "application/x-www-form-urlencoded"
    status, got, _ = await send(
        proxy.base, token, "POST", "/v1/form-transfers", b"amount=50&to=x", form
    )
    assert status == 200, got
    assert api.last()[1] == b"amount=50&to=x"
    status, _, _ = await send(proxy.base, token, "POST", "/v1/form-transfers", b"amount=5000", form)
    assert status == 403
    for body, detail in [
        (b"amount=5&amount=5000", "could not be evaluated"),  # two values: the condition fails
        (b"amount=5&Amount=5000", "one key to a parser"),  # ASP.NET binds either
        (b"amount=5;amount=5000", "';'"),  # older Rack and cgi split on ';'
        (b"amount=5&user[role]=admin", "nested or renamed"),  # PHP, Rails, qs
        (b"amount=5&amount.x=1", "nested or renamed"),  # Spring, and PHP's a_x
        (b"amount=%zz", "malformed"),
        (b"amount=%ff", "UTF-8"),
        ("amount=5&to=é".encode(), "ASCII"),
    ]:
        status, got, _ = await send(proxy.base, token, "POST", "/v1/form-transfers", body, form)
        assert status in (400, 403), (body, got)
        assert detail in got["detail"], (body, got)
    assert len(api.bodies) == 1


async def test_a_body_no_rule_reads_streams_unread(
    make_proxy: ProxyFactory, api: Api, keys: Keys
) -> None:
    proxy = await make_proxy(policy=POLICY, upstream_url=api.url)
    blob = bytes(range(256)) * 4096  # 1 MiB, not JSON
    status, got, _ = await send(
        proxy.base, keys.token("payer"), "POST", "/v1/files", blob, "application/octet-stream"
    )
    assert status == 200 and got == {"received": len(blob)}
    assert api.last()[1] == blob


async def test_expect_continue_on_a_body_that_must_be_read(
    make_proxy: ProxyFactory, api: Api, keys: Keys
) -> None:
    proxy = await make_proxy(policy=POLICY, upstream_url=api.url)
    host, port = proxy.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /v1/transfers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + keys.token("payer").encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 13\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100"), interim
        writer.write(b'{"amount": 5}')
        final = await asyncio.wait_for(reader.read(), 5)
        assert final.startswith(b"HTTP/1.1 200"), final
    finally:
        writer.close()
    assert api.last()[1] == b'{"amount": 5}'


async def test_only_the_workflow_fields_may_change(
    make_proxy: ProxyFactory, api: Api, keys: Keys
) -> None:
    proxy = await make_proxy(policy=POLICY, upstream_url=api.url)
    token = keys.token("hr-bot")
    ok = await send(proxy.base, token, "PATCH", "/v1/employees/7", b'{"title": "Lead"}')
    assert ok[0] == 200, ok
    status, got, _ = await send(proxy.base, token, "PATCH", "/v1/employees/7", b'{"salary": 9e9}')
    assert status == 403 and "no rule allows" in got["detail"]
    status, got, _ = await send(proxy.base, token, "PATCH", "/v1/employees/7", b'{"role": "admin"}')
    assert status == 403 and got["detail"] == "agents never change roles"
    assert [b for _, b, _ in api.bodies] == [b'{"title": "Lead"}']


async def approve(proxy_admin: str, token: str, approval_id: str) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{proxy_admin}/v1/approvals/{approval_id}/approve",
            headers=auth(token),
            json={"reason": "checked"},
        ) as r,
    ):
        assert r.status == 200, await r.text()


async def approval(proxy_admin: str, token: str, approval_id: str) -> dict[str, Any]:
    url = f"{proxy_admin}/v1/approvals/{approval_id}"
    async with aiohttp.ClientSession() as s, s.get(url, headers=auth(token)) as r:
        assert r.status == 200, await r.text()
        return await r.json()  # type: ignore[no-any-return]


async def test_an_approval_binds_the_body_in_canonical_form(
    make_proxy: ProxyFactory, api: Api, keys: Keys
) -> None:
    proxy = await make_proxy(policy=POLICY, upstream_url=api.url)
    token, carol = keys.token("payer"), keys.token("carol")
    path = "/v1/transfers"
    status, got, _ = await send(proxy.base, token, "POST", path, b'{"amount": 500, "to": "x"}')
    assert status == 403
    first = got["approval_id"]
    # The approver sees the body whole.
    shown = await approval(proxy.admin, carol, first)
    assert shown["arguments"] == {"amount": 500, "to": "x"}, shown
    await approve(proxy.admin, carol, first)
    # A 500 approval does not release five million: that is a new approval.
    status, got, _ = await send(proxy.base, token, "POST", path, b'{"amount": 5000000, "to": "x"}')
    assert status == 403 and got["approval_id"] != first
    assert api.bodies == []
    # The same transfer, spelled otherwise (key order, 5e2), is the one approved.
    status, got, _ = await send(proxy.base, token, "POST", path, b'{"to": "x", "amount": 5e2}')
    assert status == 200, got
    assert api.last()[1] == b'{"to": "x", "amount": 5e2}'
    # It granted one call.
    status, got, _ = await send(proxy.base, token, "POST", path, b'{"amount": 500.0, "to": "x"}')
    assert status == 403 and got["approval_id"] != first


async def test_answers_are_shaped_by_every_allowing_rule(
    make_proxy: ProxyFactory, api: Api, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    # broad-reads (no obligations) is written first and would decide: employee-reads'
    # obligations apply all the same.
    proxy = await make_proxy(policy=POLICY, upstream_url=api.url)
    token = keys.token("alice", act={"sub": "hr-bot"})
    status, got, headers = await send(proxy.base, token, "GET", "/v1/employees", content_type=None)
    assert status == 200, got
    assert got == {
        "items": [
            {"id": "1", "manager": "alice", "name": "Ann"},
            {"id": "3", "manager": "alice", "name": "Cid"},
        ],
        "total": 3,
    }
    assert int(headers["Content-Length"]) == len(orjson.dumps(got))
    status, got, _ = await send(proxy.base, token, "GET", "/v1/employees/1", content_type=None)
    assert got == {"id": "1", "name": "Ann"}
    out, _ = captured(capsys, proxy)
    shaped = [r["shaped"] for r in log_records(out) if "shaped" in r]
    assert shaped[0] == {"rules": ["employee-reads"], "fields_removed": 4, "items_removed": 1}
    assert shaped[1] == {"rules": ["employee-reads"], "fields_removed": 1, "items_removed": 0}


async def test_answers_that_cannot_be_shaped_are_never_passed_on(
    make_proxy: ProxyFactory, api: Api, keys: Keys
) -> None:
    proxy = await make_proxy(
        policy=POLICY, upstream_url=api.url, upstream_extra="    max_response_bytes: 65536"
    )
    token = keys.token("alice", act={"sub": "hr-bot"})
    for kind, detail in [
        ("text", "not JSON"),
        ("wrong", "expected a list"),
        ("big", "larger than 65536 bytes"),
        ("duplicate", "every parser reads alike"),
    ]:
        status, got, headers = await send(
            proxy.base, token, "GET", f"/v1/shaped/{kind}", content_type=None
        )
        assert status == 502, (kind, got)
        assert detail in got["detail"], (kind, got)
        assert "100" not in str(got) and "salary" not in str(got), got
    # An answer compressed although it was asked for without: decoded and shaped.
    status, got, headers = await send(
        proxy.base, token, "GET", "/v1/shaped/gzip", content_type=None
    )
    assert status == 200 and [i["id"] for i in got["items"]] == ["1", "3"]
    assert "Content-Encoding" not in headers
    # An error answer is shaped like any other; an empty one passes.
    status, got, _ = await send(proxy.base, token, "GET", "/v1/shaped/error", content_type=None)
    assert status == 404 and all("salary" not in i for i in got["items"])
    status, got, _ = await send(proxy.base, token, "GET", "/v1/shaped/empty", content_type=None)
    assert status == 204
    # A range would cut the JSON: the upstream never sees one, nor an Accept-Encoding.
    await send(proxy.base, token, "GET", "/v1/shaped/ok", content_type=None, Range="bytes=0-20")
    seen = api.last()[2]
    assert "range" not in seen and "accept-encoding" not in seen


async def test_audit_redaction_applies_to_http_bodies(
    make_proxy: ProxyFactory, api: Api, keys: Keys, tmp_path: Any
) -> None:
    trail = tmp_path / "audit.jsonl"
    (tmp_path / "hmac").write_text("k" * 32)
    proxy = await make_proxy(
        policy=POLICY,
        upstream_url=api.url,
        extra=f"audit: {{file: {trail}, hmac_key_file: {tmp_path / 'hmac'}, redact: [args.ssn]}}",
    )
    body = b'{"ssn": "123-45-6789", "name": "x"}'
    status, _, _ = await send(proxy.base, keys.token("payer"), "POST", "/v1/files", body)
    assert status == 200
    assert api.last()[1] == body
    await proxy.server.stop()
    records = [orjson.loads(line) for line in trail.read_bytes().splitlines()]
    calls = [r for r in records if r.get("action") == "http:POST /v1/files"]
    assert calls and calls[0]["args"]["name"] == "x"
    assert calls[0]["args"]["ssn"].startswith("hmac-sha256:")
    assert b"123-45-6789" not in trail.read_bytes()


async def test_an_upstream_can_force_the_body_kind(
    make_proxy: ProxyFactory, api: Api, keys: Keys
) -> None:
    proxy = await make_proxy(policy=POLICY, upstream_url=api.url, upstream_extra="    body: json")
    token = keys.token("payer")
    # Without a Content-Type the body is read as the JSON the upstream takes it for.
    status, got, _ = await send(
        proxy.base, token, "POST", "/v1/transfers", b'{"amount": 5000000}', content_type=None
    )
    assert status == 403 and got["approval_id"]
    status, got, _ = await send(
        proxy.base, token, "POST", "/v1/files", b"amount=5", "application/x-www-form-urlencoded"
    )
    assert status == 415 and "body: json" in got["detail"]
    # body: stream never reads one: rules on args would deny every call, so such a config
    # does not start (validate names the rule).
    with pytest.raises(ConfigError) as info:
        await make_proxy(policy=POLICY, upstream_url=api.url, upstream_extra="    body: stream")
    assert "rule small-transfers.when: reads args on HTTP calls, but upstream tool never" in str(
        info.value
    )


async def test_explain_reads_a_body_as_the_data_plane_does(
    make_proxy: ProxyFactory, api: Api, keys: Keys
) -> None:
    proxy = await make_proxy(
        policy=POLICY, upstream_url=api.url, extra='admin: {operators: ["role:security"]}'
    )
    operator = {"Authorization": f"Bearer {keys.token('sec', roles=['security'])}"}
    token = keys.token("payer")

    async def explain(**fields: Any) -> tuple[int, dict[str, Any]]:
        body = {"token": token, "request": "POST /v1/transfers", **fields}
        async with (
            aiohttp.ClientSession() as s,
            s.post(proxy.admin + "/v1/explain", json=body, headers=operator) as r,
        ):
            return r.status, await r.json()

    status, result = await explain(body='{"amount": 5e6}')
    assert status == 200, result
    assert result["decision"]["rule"] == "large-transfers"
    assert result["body"].startswith("read as args: rule ")
    (step,) = [t for t in result["trace"] if t["rule"] == "small-transfers"]
    assert step["values"] == {"args.amount": 5000000.0}
    status, result = await explain(body='{"amount": 5, "Amount": 9}')
    assert status == 400 and "one key to a parser" in result["detail"]
    status, result = await explain(body="amount=5", content_type="text/plain")
    assert status == 415
    # A body no rule reads is not read, as the data plane would stream it.
    token = keys.token("payer")
    body = {"token": token, "request": "POST /v1/files", "body": "not json"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.admin + "/v1/explain", json=body, headers=operator) as r,
    ):
        result = await r.json()
    assert result["decision"]["rule"] == "uploads" and result["body"].startswith("not read")

    out = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "agentproxy",
            "explain",
            "--config",
            str(proxy.config_path),
            "--token",
            token,
            "--request",
            "POST /v1/form-transfers",
            "--body",
            "amount=500",
            "--content-type",
            "application/x-www-form-urlencoded",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "args.amount = '500'" in out.stdout and "effect:  deny" in out.stdout


async def test_a_post_never_names_another_method(
    make_proxy: ProxyFactory, api: Api, keys: Keys
) -> None:
    # Rails (Rack::MethodOverride), Laravel and Symfony run a POST with a _method field as
    # that method: a DELETE that policy decided as an allowed POST.
    proxy = await make_proxy(policy=POLICY, upstream_url=api.url)
    token = keys.token("payer")
    form = "application/x-www-form-urlencoded"
    for body in (
        b"_method=DELETE",
        b"name=x&_METHOD=delete",
        b"a=1;_method=PUT",
        b"_method%5B%5D=x",
    ):
        status, got, _ = await send(proxy.base, token, "POST", "/v1/files", body, form)
        assert status == 400 and "_method" in got["detail"], (body, got)
    status, got, _ = await send(proxy.base, token, "POST", "/v1/files?_method=DELETE", b"{}")
    assert status == 400 and "_method" in got["detail"]
    assert api.bodies == []
    # A form no rule reads is otherwise not held to the strict reading: Rails' nested names
    # pass, byte for byte.
    nested = b"user[name]=Ann&user[tags][]=a&file.name=x"
    status, got, _ = await send(proxy.base, token, "POST", "/v1/files", nested, form)
    assert status == 200, got
    assert api.last()[1] == nested
