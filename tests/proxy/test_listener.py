"""The data-plane listener, attacked on the wire: what llhttp refuses never reaches the
upstream, a smuggled request inside a body or after an upgrade is never parsed as one,
pipelined requests are answered in order, heads are bounded, and a refusal sent before its
body arrived is read by the client, not reset. Each asserts what the upstream received."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from agentproxy.proxy.http_wire import serialize_head
from tests.conftest import Keys, Proxy, Upstream
from tests.proxy.conftest import RawResponse, read_response
from tests.proxy.test_connection_bounds import metric


async def exchange(proxy: Proxy, raw: bytes, answers: int = 1) -> tuple[list[RawResponse], bytes]:
    """Writes `raw` as it is, reads `answers` answers, then what comes until the server
    closes (fails if it does not within 5 s)."""
    port = int(proxy.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        got = [await asyncio.wait_for(read_response(reader), 5) for _ in range(answers)]
        rest = await asyncio.wait_for(reader.read(-1), 5)
        return got, rest
    finally:
        writer.close()


def problem(response: RawResponse) -> dict[str, object]:
    assert response.header("Content-Type") == "application/problem+json"
    document: dict[str, object] = orjson.loads(response.body)
    return document


def get(path: str, token: str, extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n{extra}\r\n"
    ).encode()


SMUGGLED = b"GET /v1/employees/7/salary HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    "framing",
    [
        # CL.TE and TE.CL: one of the two framings hides the salary request in the body.
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        f"Transfer-Encoding: chunked\r\nContent-Length: {len(SMUGGLED) + 5}\r\n\r\n".encode()
        + b"0\r\n\r\n"
        + SMUGGLED,
        b"Content-Length: 5\r\nContent-Length: 50\r\n\r\n",
        b"Content-Length: +5\r\n\r\nhello",
        b"Transfer-Encoding: gzip\r\n\r\nhello",
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"Content-Length : 5\r\n\r\nhello",
        b"X-Folded: a\r\n b\r\n\r\n",
    ],
    ids=[
        "cl-te",
        "te-cl",
        "two-lengths",
        "signed-length",
        "te-not-chunked",
        "bad-chunk",
        "space-before-colon",
        "obs-fold",
    ],
)
async def test_ambiguous_framing_is_400_and_nothing_reaches_the_upstream(
    proxy: Proxy, upstream: Upstream, keys: Keys, framing: bytes
) -> None:
    raw = (
        f"POST /v1/employees HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {keys.token()}\r\n"
    ).encode() + framing
    before = await metric(proxy, 'agentproxy_connections_refused_total{reason="malformed_request"}')
    (answer,), rest = await exchange(proxy, raw)
    assert answer.status == 400, answer
    assert problem(answer)["type"] == "https://agentproxy.dev/problems/bad-request"
    assert answer.header("Connection") == "close"
    assert rest == b""  # closed: nothing after the refused head is read as a request
    assert upstream.seen == []
    after = await metric(proxy, 'agentproxy_connections_refused_total{reason="malformed_request"}')
    assert after == before + 1


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"GET / HTTP/2.0\r\n\r\n", 400),
        (b"GET / HTTP/1.1\nHost: x\n\n", 400),
        (b"GET /" + b"a" * 17_000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 17_000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(129)) + b"\r\n", 431),
        (
            b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 700) for i in range(100)),
            431,
        ),
    ],
    ids=["http2-line", "bare-lf", "long-target", "long-field", "many-fields", "large-head"],
)
async def test_heads_out_of_bounds_are_refused_and_closed(
    proxy: Proxy, upstream: Upstream, line: bytes, status: int
) -> None:
    (answer,), rest = await exchange(proxy, line)
    assert answer.status == status
    assert problem(answer)["status"] == status
    assert rest == b""
    assert upstream.seen == []


async def test_pipelined_requests_are_answered_in_order_and_a_bad_one_after_them_refused(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    token = keys.token()
    raw = (
        get("/v1/employees/1", token)
        + get("/v1/employees/7/salary", token)  # denied in the middle
        + get("/v1/employees/2", token)
        + b"GET /v1/employees/3 HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
    )
    answers, rest = await exchange(proxy, raw, answers=4)
    assert [a.status for a in answers] == [200, 403, 200, 400]
    assert orjson.loads(answers[0].body)["path"] == "/v1/employees/1"
    assert orjson.loads(answers[2].body)["path"] == "/v1/employees/2"
    assert "Duplicate Content-Length" in str(problem(answers[3])["detail"])
    assert rest == b""  # closed after the refusal: nothing after it could be framed
    assert [s.path for s in upstream.seen] == ["/v1/employees/1", "/v1/employees/2"]


async def test_bytes_after_an_upgrade_request_are_never_parsed_as_a_request(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    raw = get("/v1/employees/1", keys.token(), "Connection: Upgrade\r\nUpgrade: websocket\r\n")
    (answer,), rest = await exchange(proxy, raw + SMUGGLED)
    assert answer.status == 200  # answered as plain HTTP/1.1 (Upgrade is hop-by-hop)
    assert rest == b""
    assert [s.path for s in upstream.seen] == ["/v1/employees/1"]
    assert "Upgrade" not in upstream.seen[0].headers


async def test_keep_alive_reuses_one_connection_and_http10_closes(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    token = keys.token()
    port = int(proxy.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i in range(3):  # one after another on the one connection
            writer.write(get(f"/v1/employees/{i}", token))
            answer = await asyncio.wait_for(read_response(reader), 5)
            assert answer.status == 200
            assert orjson.loads(answer.body)["path"] == f"/v1/employees/{i}"
    finally:
        writer.close()
    raw = f"GET /v1/employees/1 HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    (answer,), rest = await exchange(proxy, raw)
    assert answer.status == 200
    assert rest == b""


async def test_a_refusal_before_the_body_arrives_is_read_not_reset(
    proxy: Proxy, upstream: Upstream
) -> None:
    """401 for a 1 MiB upload without a token: the client reads the answer while it is
    still sending (the rest is read and dropped, then the connection closes)."""
    port = int(proxy.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/employees HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n")
        writer.write(b"x" * 65536)
        await writer.drain()
        answer = await asyncio.wait_for(read_response(reader), 5)
        assert answer.status == 401
        for _ in range(15):
            writer.write(b"x" * 65536)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(-1), 5) == b""
    finally:
        writer.close()
    assert upstream.seen == []


def test_an_answer_header_cannot_split_the_response() -> None:
    for name, value in (("X-A", "1\r\nSet-Cookie: a=b"), ("X-A\r\nB", "1"), ("X-A", "1\n")):
        with pytest.raises(ValueError):
            serialize_head((1, 1), 200, None, [(name, value)])
    with pytest.raises(ValueError):
        serialize_head((1, 1), 200, "OK\r\nX: y", [])
    assert serialize_head((1, 1), 204, None, [("A", "b")]) == (
        b"HTTP/1.1 204 No Content\r\nA: b\r\n\r\n"
    )
