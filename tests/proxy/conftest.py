"""Helpers for the end-to-end proxy tests: raw HTTP, header lookups, log parsing, custom configs.

The shared fixtures (`keys`, `upstream`, `make_proxy`, `proxy`) live in `tests/conftest.py`.
"""

from __future__ import annotations

import asyncio
import base64
import socket
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from tests.conftest import CustomProxyFactory, Proxy, Seen


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def header_values(seen: Seen, name: str) -> list[str]:
    """Every value the upstream received for `name`, matched case-insensitively."""
    return [value for key, value in seen.header_list if key.lower() == name.lower()]


def only_header(seen: Seen, name: str) -> str:
    """The single value the upstream received for `name`; fails if absent or repeated."""
    found = header_values(seen, name)
    assert len(found) == 1, f"{name}: expected exactly one value, upstream got {found!r}"
    return found[0]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def closed_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> dict[str, Any]:
        data = orjson.loads(self.body)
        assert isinstance(data, dict)
        return data


async def raw_request(
    base: str,
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> RawResponse:
    """Sends one request exactly as written (no client-side normalization) and reads the answer.

    The request asks for `Connection: close` (unless it sets its own Connection header), so the
    answer ends at EOF; a chunked answer is de-chunked.
    """
    host_port = base.removeprefix("http://")
    host, _, port = host_port.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host_port}"]
        names = {name.lower() for name, _ in headers or []}
        if "connection" not in names:
            lines.append("Connection: close")
        if body and "content-length" not in names and "transfer-encoding" not in names:
            lines.append(f"Content-Length: {len(body)}")
        lines.extend(f"{name}: {value}" for name, value in headers or [])
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), timeout=10)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    """Reads one response: by Content-Length when it has one, else chunked, else to EOF.

    Not waiting for EOF matters: after refusing a request whose body it did not read, aiohttp
    keeps the connection open for a while to drain the body (so that a reset cannot destroy
    the answer before the client reads it).
    """
    head = await reader.readuntil(b"\r\n\r\n")
    response = parse_response(head)
    length = response.header("Content-Length")
    if length is not None:
        response.body = await reader.readexactly(int(length))
    elif (response.header("Transfer-Encoding") or "").lower() == "chunked":
        response.body = _dechunk(await reader.read(-1))
    else:
        response.body = await reader.read(-1)
    return response


def parse_response(raw: bytes) -> RawResponse:
    """Parses a whole response (head and body) given as bytes."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = []
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    response = RawResponse(status, headers, rest)
    if (response.header("Transfer-Encoding") or "").lower() == "chunked":
        response.body = _dechunk(rest)
    return response


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


def captured(capsys: pytest.CaptureFixture[str], *proxies: Proxy) -> tuple[str, str]:
    """stdout and stderr so far, once every proxy's decision log has written what it holds.

    The decision log batches lines (a few ms late); flushing first makes the read exact.
    The proxies must have been started inside the test, after `capsys` replaced stdout.
    """
    for proxy in proxies:
        proxy.server.decision_log.flush()
    out, err = capsys.readouterr()
    return out, err


def log_records(text: str) -> list[dict[str, Any]]:
    """The decision log lines in captured output (one JSON object per line)."""
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            record = orjson.loads(line)
            assert isinstance(record, dict)
            records.append(record)
    return records


def record_for(records: list[dict[str, Any]], decision_id: str) -> dict[str, Any]:
    """The one log record of a call; fails unless exactly one line carries `decision_id`."""
    found = [r for r in records if r.get("decision_id") == decision_id]
    assert len(found) == 1, f"expected one log line for {decision_id}, found {len(found)}"
    return found[0]


__all__ = ["CustomProxyFactory"]  # the fixture lives in tests/conftest.py
