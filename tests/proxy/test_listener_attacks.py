"""The data-plane listener attacked by a hostile, authenticated agent over real sockets:
what each attack makes the upstream receive, what the client reads, and whether the one
event loop stays free for the other agents."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator

import orjson
import pytest

from agentproxy.proxy.listener import MAX_PIPELINED
from tests.conftest import Keys, Proxy, ProxyFactory, Upstream
from tests.proxy.conftest import RawResponse, read_response
from tests.proxy.test_connection_bounds import metric
from tests.proxy.test_listener import exchange, get, problem

MALFORMED = 'agentproxy_connections_refused_total{reason="malformed_request"}'


def port_of(proxy: Proxy) -> int:
    return int(proxy.base.rsplit(":", 1)[1])


async def connect(proxy: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port_of(proxy))


@contextlib.asynccontextmanager
async def loop_gaps() -> AsyncIterator[list[float]]:
    """The longest the event loop (the proxy's, in this process) went without running a
    ready task, measured while the block runs."""
    gaps: list[float] = [0.0]

    async def tick() -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(0)
            gaps.append(time.monotonic() - started)

    ticker = asyncio.create_task(tick())
    try:
        yield gaps
    finally:
        ticker.cancel()


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The proxy's errors (the upstream's aiohttp server logs a request cut short)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and not r.name.startswith("aiohttp")
    ]


def chunked_post(token: str, path: str = "/upload") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()


# Trailers


async def test_a_trailer_that_never_ends_is_refused_before_it_grows(
    make_proxy: ProxyFactory, upstream: Upstream, keys: Keys
) -> None:
    """httptools buffers a header field until it ends, copying it on every read; in the
    head that is bounded, but a trailer field arrives after the head: it grew without
    limit (24 MiB in 3 s, each read copying all of it) until body_timeout."""
    proxy = await make_proxy(listen="body_timeout: 30")
    reader, writer = await connect(proxy)
    writer.write(chunked_post(keys.token()) + b"5\r\nhello\r\n0\r\nX-Trailer: ")

    async def trailer() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(128):  # 8 MiB, never ended
                writer.write(b"a" * 65536)
                await writer.drain()

    sending = asyncio.create_task(trailer())
    try:
        # Long before body_timeout: refused once the trailer passes the head's bound.
        answer = await asyncio.wait_for(read_response(reader), 2)
    finally:
        sending.cancel()
        writer.close()
    assert answer.status == 431
    assert "trailer" in str(problem(answer)["detail"])
    assert upstream.seen == []  # the upload never looked complete


async def test_trailer_fields_never_reach_the_upstream_as_headers(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    raw = chunked_post(keys.token()) + (
        b'5;ext=1;q="a"\r\nhello\r\n0\r\nX-Forwarded-For: 6.6.6.6\r\nX-Length: 99\r\n'
        b"Authorization: Bearer forged\r\nConnection: close\r\n\r\n"
    )
    (answer,), _ = await exchange(proxy, raw + b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", 1)
    assert answer.status == 200
    assert orjson.loads(answer.body)["bytes"] == 5  # the extension is framing, not data
    (seen,) = upstream.seen
    values = [value for _, value in seen.header_list]
    assert "6.6.6.6" not in values and "99" not in values
    assert not any("forged" in value for value in values)


# Pipelining


async def test_one_read_of_tiny_pipelined_requests_does_not_hold_the_loop(
    proxy: Proxy, upstream: Upstream
) -> None:
    """20,000 bodiless requests in one write: llhttp parses a whole read (256 KiB) before
    the connection can pause, and each refusal is answered without suspending, so one
    read held the loop for ~0.5 s (every agent stalled) and its requests in memory."""
    reader, writer = await connect(proxy)
    before = await metric(proxy, MALFORMED)
    async with loop_gaps() as gaps:
        writer.write(b"GET / HTTP/1.1\r\n\r\n" * 20_000)
        raw = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    # ~0.5 s before; well under 1 ms alone now (the margin is for a loaded test run).
    assert max(gaps) < 0.25, f"the loop was held for {max(gaps):.3f}s"
    answers = raw.count(b"HTTP/1.1 ")
    assert answers == MAX_PIPELINED + 1  # those queued, then the refusal, then closed
    assert raw.count(b"HTTP/1.1 401 ") == MAX_PIPELINED
    assert b"requests pipelined" in raw.rsplit(b"HTTP/1.1 ", 1)[1]
    assert await metric(proxy, MALFORMED) == before + 1
    assert upstream.seen == []


async def test_pipelined_requests_up_to_the_cap_are_all_answered_in_order(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    token = keys.token()
    ids = range(100, 100 + MAX_PIPELINED - 1)
    raw = b"".join(get(f"/v1/employees/{i}", token) for i in ids)
    raw += get("/v1/employees/7/salary", token, "Connection: close\r\n")
    answers, rest = await exchange(proxy, raw, answers=MAX_PIPELINED)
    assert [a.status for a in answers] == [200] * (MAX_PIPELINED - 1) + [403]
    assert [orjson.loads(a.body)["path"] for a in answers[:-1]] == [
        f"/v1/employees/{i}" for i in ids
    ]
    assert rest == b""
    assert len(upstream.seen) == MAX_PIPELINED - 1


async def test_a_pipeline_flood_does_not_slow_another_agent(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    token = keys.token()
    good = get("/v1/employees/1", token)
    latencies: list[float] = []
    r2, w2 = await connect(proxy)

    async def flood() -> None:
        while True:
            reader, writer = await connect(proxy)
            try:
                writer.write(b"GET / HTTP/1.1\r\n\r\n" * 20_000)
                with contextlib.suppress(ConnectionError):
                    await reader.read(-1)
            finally:
                writer.close()

    attacker = asyncio.create_task(flood())
    try:
        for _ in range(30):
            started = time.monotonic()
            w2.write(good)
            answer = await asyncio.wait_for(read_response(r2), 5)
            latencies.append(time.monotonic() - started)
            assert answer.status == 200
            await asyncio.sleep(0.01)
    finally:
        attacker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await attacker
        w2.close()
    assert sorted(latencies)[-3] < 0.15, f"latencies {sorted(latencies)[-5:]}"


# Clients that leave or half-close


async def test_a_half_close_is_a_client_gone_and_ends_the_upstream_stream(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    """TCP cannot tell a half-close from a close: a FIN mid-answer is a client gone (as
    nginx's 499), and a silent stream it was reading is let go at once (MCP resumption
    needs the upstream to see it end), not at the next write, which may never come."""
    reader, writer = await connect(proxy)
    writer.write(get("/sse", keys.token()))
    await asyncio.wait_for(reader.readuntil(b"data: first\n\n"), 5)
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(-1), 5) in (b"", b"\r\n")
    writer.close()


async def test_a_half_close_mid_body_never_reaches_the_upstream(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    reader, writer = await connect(proxy)
    writer.write(
        f"POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {keys.token()}\r\n"
        "Content-Length: 100\r\n\r\nshort".encode()
    )
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(-1), 5) == b""
    writer.close()
    await asyncio.sleep(0.2)
    assert upstream.seen == []


async def test_a_client_gone_while_its_answer_is_awaited_leaves_no_task_error(
    proxy: Proxy, upstream: Upstream, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """connection_lost emptied the queue under `_serve`, whose popleft then raised
    IndexError ('Task exception was never retrieved')."""
    _reader, writer = await connect(proxy)
    writer.write(get("/slow?s=0.2", keys.token()))
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.transport.abort()
    await asyncio.sleep(0.4)
    assert errors(caplog) == []
    assert [s.path for s in upstream.seen] == ["/slow?s=0.2"]


@pytest.mark.parametrize("sent", [1000, 200_000], ids=["read-ahead", "streaming"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_client_gone_mid_body_is_no_bug_and_never_reaches_the_upstream(
    proxy: Proxy,
    upstream: Upstream,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
    chunked: bool,
    sent: int,
) -> None:
    """Any agent can do this on every call: it must not log a traceback each time (it did
    while the body was read ahead of the upstream request, the first 64 KiB)."""
    _reader, writer = await connect(proxy)
    framing = "Transfer-Encoding: chunked" if chunked else "Content-Length: 300000"
    writer.write(
        f"POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {keys.token()}\r\n"
        f"{framing}\r\n\r\n".encode()
    )
    body = b"x" * sent
    writer.write((b"%x\r\n" % len(body) + body + b"\r\n") if chunked else body)
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.transport.abort()
    await asyncio.sleep(0.4)
    assert upstream.seen == []
    assert errors(caplog) == []
    # The caller left: never blamed on the upstream (it was a 502 "upstream failed").
    blamed = [r.getMessage() for r in caplog.records if "upstream" in r.getMessage()]
    assert blamed == []


async def test_an_invalid_chunk_mid_body_is_one_400_and_no_bug(
    proxy: Proxy, upstream: Upstream, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad chunk arriving while the exchange reads the body: it was a 500 with a
    traceback; the listener's refusal is the answer, once."""
    reader, writer = await connect(proxy)
    writer.write(chunked_post(keys.token()) + b"5\r\nhello\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.write(b"zz\r\n" + get("/v1/employees/1", keys.token()))
    answer = await asyncio.wait_for(read_response(reader), 5)
    rest = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    assert answer.status == 400
    assert "not valid HTTP/1.1" in str(problem(answer)["detail"])
    assert rest == b""  # one answer, then closed
    assert upstream.seen == []
    assert errors(caplog) == []


# Targets, headers and chunks llhttp might accept


@pytest.mark.parametrize(
    "line",
    [
        "GET http://127.0.0.1/v1/employees/7/salary HTTP/1.1",
        "GET http://evil.example/v1/employees/1 HTTP/1.1",
        "OPTIONS * HTTP/1.1",
        "GET //evil.example/v1/employees/7/salary HTTP/1.1",
    ],
    ids=["absolute-denied", "absolute-other-host", "asterisk", "scheme-relative"],
)
async def test_targets_that_are_not_origin_form_never_reach_the_upstream(
    proxy: Proxy, upstream: Upstream, keys: Keys, line: str
) -> None:
    token = keys.token()
    raw = f"{line}\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    answers, _rest = await exchange(
        proxy, raw + get("/v1/employees/1", token, "Connection: close\r\n"), answers=2
    )
    assert answers[0].status in (400, 403)
    assert answers[1].status == 200  # still in step after the refusal
    assert [s.path for s in upstream.seen] == ["/v1/employees/1"]


async def test_connect_is_answered_and_nothing_after_it_is_parsed(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    token = keys.token()
    raw = f"CONNECT evil.example:443 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
    (answer,), rest = await exchange(proxy, raw.encode() + get("/v1/employees/1", token))
    assert answer.status == 400
    assert rest == b""
    assert upstream.seen == []


@pytest.mark.parametrize(
    "framing",
    [
        b"X-Note: a\x00b\r\nContent-Length: 5\r\n\r\nhello",
        b"X-Note: a\rb\r\nContent-Length: 5\r\n\r\nhello",
        b"Transfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\n",
        b"Transfer-Encoding: chunked\r\n\r\n5\rhello\r\n0\r\n\r\n",
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n",
        b"Content-Length: 5\r\n\r\nhello\x00",
    ],
    ids=["nul", "bare-cr", "te-twice", "chunk-overflow", "cr-in-chunk", "lf-after-data", "tail"],
)
async def test_framing_tricks_are_refused_and_never_reach_the_upstream(
    proxy: Proxy, upstream: Upstream, keys: Keys, framing: bytes
) -> None:
    raw = (
        f"POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {keys.token()}\r\n".encode()
        + framing
    )
    answers, rest = await exchange(proxy, raw, answers=1)
    if framing.endswith(b"\x00"):  # the body is fine; the NUL starts a request llhttp refuses
        answers += [await _one(rest)]
        assert [a.status for a in answers] == [200, 400]
        assert [s.body_bytes for s in upstream.seen] == [5]
        return
    assert answers[0].status == 400
    assert rest == b""
    assert upstream.seen == []


async def _one(raw: bytes) -> RawResponse:
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    return await read_response(reader)


# Expect: 100-continue


async def test_a_denied_request_expecting_100_gets_no_100_and_a_closing_answer(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    raw = (
        f"PUT /v1/employees/7/salary HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {keys.token()}"
        "\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n"
    ).encode()
    reader, writer = await connect(proxy)
    writer.write(raw)
    answer = await asyncio.wait_for(read_response(reader), 5)
    assert answer.status == 403
    assert answer.header("Connection") == "close"
    writer.write(b"0123456789" + get("/v1/employees/1", keys.token()))  # sent anyway
    assert await asyncio.wait_for(reader.read(-1), 5) == b""
    writer.close()
    assert upstream.seen == []


# A client that never reads


async def test_a_client_that_never_reads_a_download_is_cut_off(
    make_proxy: ProxyFactory, upstream: Upstream, keys: Keys
) -> None:
    """A zero receive window holds the answer's writer, the upstream request and a
    connection slot for as long as the client likes: nothing bounded a stalled write."""
    proxy = await make_proxy(listen="idle_timeout: 1")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port_of(proxy)))
    sock.setblocking(False)
    gauge = 'agentproxy_connections{listener="http"}'
    try:
        sock.send(get("/download?bytes=500000000", keys.token()))
        # The kernel's buffers fill first, then the 1 s stall; the client reads nothing
        # meanwhile (a read would open its window), so the proxy's own count says when.
        for _ in range(80):  # 20 s
            await asyncio.sleep(0.25)
            if await metric(proxy, gauge) == 0:
                break
        open_ = await metric(proxy, gauge)
    finally:
        sock.close()
    assert open_ == 0, "the proxy still holds a client that has read nothing for 20 s"


# Framing of answers, and requests after the last one


async def test_answers_without_a_body_keep_the_connection_in_step(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    """HEAD, 204 and 304 carry no body whatever their headers say: a byte too many would be
    read as the start of the next answer."""
    token = keys.token()
    head = (
        f"HEAD /status?code=200&bytes=5000 HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()
    raw = (
        head
        + get("/status?code=304", token)
        + get("/status?code=204", token)
        + get("/v1/employees/1", token, "Connection: close\r\n")
    )
    port = port_of(proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    try:
        first = parse_head(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5))
        second = parse_head(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5))
        third = parse_head(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5))
        last = await asyncio.wait_for(read_response(reader), 5)
        assert await asyncio.wait_for(reader.read(-1), 5) == b""
    finally:
        writer.close()
    assert (first.status, first.header("Content-Length")) == (200, "5000")
    assert first.header("Transfer-Encoding") is None
    assert (second.status, second.header("Content-Length")) == (304, None)
    assert (third.status, third.header("Content-Length")) == (204, None)
    assert last.status == 200 and orjson.loads(last.body)["path"] == "/v1/employees/1"


def parse_head(raw: bytes) -> RawResponse:
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    headers = [
        (n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines if line)
    ]
    return RawResponse(int(status_line.split(" ")[1]), headers, b"")


@pytest.mark.parametrize(
    "first",
    [
        "GET /v1/employees/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n",
        "GET /v1/employees/1 HTTP/1.0\r\n",
    ],
    ids=["connection-close", "http10"],
)
async def test_nothing_after_a_closing_request_is_handled(
    proxy: Proxy, upstream: Upstream, keys: Keys, first: str
) -> None:
    token = keys.token()
    raw = f"{first}Authorization: Bearer {token}\r\n\r\n".encode()
    raw += get("/v1/employees/2", token) + get("/v1/employees/3", token)
    (answer,), rest = await exchange(proxy, raw)
    assert answer.status == 200
    assert rest == b""  # one answer, then the close
    assert [s.path for s in upstream.seen] == ["/v1/employees/1"]


async def test_http10_keep_alive_is_kept_when_asked_for(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    token = keys.token()
    reader, writer = await connect(proxy)
    keep = f"Authorization: Bearer {token}\r\nConnection: keep-alive\r\n\r\n"
    try:
        for i in (1, 2):
            writer.write(f"GET /v1/employees/{i} HTTP/1.0\r\n{keep}".encode())
            answer = await asyncio.wait_for(read_response(reader), 5)
            assert answer.status == 200
            assert (answer.header("Connection") or "").lower() == "keep-alive"
            assert answer.header("Transfer-Encoding") is None
        writer.write(
            f"GET /v1/employees/3 HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        )
        last = await asyncio.wait_for(read_response(reader), 5)
        assert await asyncio.wait_for(reader.read(-1), 5) == b""  # 1.0 without keep-alive
    finally:
        writer.close()
    assert last.status == 200
    assert [s.path for s in upstream.seen] == [f"/v1/employees/{i}" for i in (1, 2, 3)]


async def test_expect_100_on_an_allowed_upload_gets_100_then_the_answer(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    reader, writer = await connect(proxy)
    try:
        writer.write(
            f"POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {keys.token()}\r\n"
            "Expect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n".encode()
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        answer = await asyncio.wait_for(read_response(reader), 5)
    finally:
        writer.close()
    assert answer.status == 200
    assert [s.body_bytes for s in upstream.seen] == [5]
    assert "Expect" not in upstream.seen[0].headers


async def test_a_call_in_flight_at_shutdown_is_answered_and_new_ones_are_not_taken(
    make_proxy: ProxyFactory, upstream: Upstream, keys: Keys
) -> None:
    proxy = await make_proxy()
    reader, writer = await connect(proxy)
    writer.write(get("/slow?s=0.5", keys.token(), "Connection: close\r\n"))
    await writer.drain()
    await asyncio.sleep(0.1)
    stopping = asyncio.create_task(proxy.server.stop())
    try:
        answer = await asyncio.wait_for(read_response(reader), 5)
        assert answer.status == 200
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port_of(proxy))
    finally:
        writer.close()
        await stopping


async def test_empty_lines_do_not_keep_a_connection_past_its_idle_timeout(
    make_proxy: ProxyFactory,
) -> None:
    """RFC 9112 §2.2 lets a server skip CRLFs before a request line; sent forever, they
    must not hold the connection."""
    proxy = await make_proxy(listen="header_timeout: 1s, idle_timeout: 1s")
    reader, writer = await connect(proxy)
    started = time.monotonic()
    with contextlib.suppress(ConnectionError):
        while time.monotonic() - started < 4 and not reader.at_eof():
            writer.write(b"\r\n")
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(1), 0.2)
    writer.close()
    assert time.monotonic() - started < 2.5
