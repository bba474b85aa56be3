"""Stream resumption through the proxy (MCP Streamable HTTP, "Resumability and Redelivery";
issue 24): a client whose SSE answer was cut off reconnects with `GET` and `Last-Event-ID`,
and gets the rest of the answer from the upstream's event store.

That only works if the proxy lets go of the upstream request as soon as the client goes away:
while the first request is still open upstream, the SDK's server keeps delivering to it, and
the resumed stream gets nothing (what FastMCP did before)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore
from mcp.types import JSONRPCMessage

from tests.conftest import Keys, Proxy, ProxyFactory
from tests.harness.processes import free_port
from tests.mcp.conftest import POLICY, McpUpstream, build_server, serving

VERSION = "2025-11-25"  # the first to prime streams with an event id


class MemoryEvents(EventStore):
    """The smallest event store: every event kept, in order, with its stream."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, JSONRPCMessage | None]] = []

    async def store_event(self, stream_id: str, message: JSONRPCMessage | None) -> str:
        event_id = f"ev-{len(self.events) + 1}"
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(
        self, last_event_id: str, send_callback: EventCallback
    ) -> str | None:
        ids = [event_id for event_id, _, _ in self.events]
        if last_event_id not in ids:
            return None
        index = ids.index(last_event_id)
        stream = self.events[index][1]
        for event_id, stream_id, message in self.events[index + 1 :]:
            if stream_id == stream and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream


@pytest.fixture
async def resumable() -> AsyncIterator[McpUpstream]:
    port = free_port()
    state = McpUpstream(url=f"http://127.0.0.1:{port}")
    app = build_server(state).streamable_http_app(event_store=MemoryEvents())
    async with serving(app, port):
        try:
            yield state
        finally:
            state.release.set()


def headers(token: str, session: str | None = None) -> dict[str, str]:
    out = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": VERSION,
    }
    if session is not None:
        out["Mcp-Session-Id"] = session
    return out


async def events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The SSE events of an answer as they arrive: {"id": …, "data": …}."""
    event: dict[str, Any] = {}
    while True:
        line = await response.content.readline()
        if not line:
            return
        text = line.decode().rstrip("\r\n")
        if not text:
            if event:
                yield event
            event = {}
            continue
        name, _, value = text.partition(":")
        event[name] = value.removeprefix(" ")


async def _nothing() -> AsyncIterator[dict[str, Any]]:
    return
    yield


async def start_session(s: aiohttp.ClientSession, proxy: Proxy, token: str) -> str:
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": VERSION,
            "capabilities": {},
            "clientInfo": {"name": "resumer", "version": "1"},
        },
    }
    async with s.post(
        proxy.base + "/mcp", data=orjson.dumps(initialize), headers=headers(token)
    ) as r:
        assert r.status == 200, await r.text()
        session = r.headers["Mcp-Session-Id"]
        await r.read()
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with s.post(
        proxy.base + "/mcp", data=orjson.dumps(initialized), headers=headers(token, session)
    ) as r:
        assert r.status == 202, await r.text()
    return session


async def test_a_cut_off_stream_resumes_with_last_event_id(
    make_proxy: ProxyFactory, resumable: McpUpstream, keys: Keys
) -> None:
    # A long upstream timeout, as in production: the proxy must not wait for it (nor for the
    # upstream's next event) to let go of a request whose client has gone.
    proxy = await make_proxy(
        policy=POLICY,
        upstream_url=resumable.url,
        upstream_extra="    protocol: mcp",
        timeout="60s",
    )
    token = keys.token("mcp-agent")
    slow = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "slow", "arguments": {}, "_meta": {"progressToken": "p-1"}},
    }
    async with aiohttp.ClientSession() as s:
        session = await start_session(s, proxy, token)
        # The tool reports progress, then waits: the client goes away after the progress.
        cut = await s.post(
            proxy.base + "/mcp", data=orjson.dumps(slow), headers=headers(token, session)
        )
        assert cut.status == 200
        assert cut.content_type == "text/event-stream"
        seen: list[str] = []
        async for event in events(cut):
            seen.append(event["id"])
            if "notifications/progress" in event.get("data", ""):
                break
        cut.close()  # the connection is dropped mid-answer, after the progress event
        # Resumed from the first event (the priming one): the progress is replayed, which only
        # the upstream's event store can do, and only if Last-Event-ID reached it.
        resume = headers(token, session) | {"Last-Event-ID": seen[0]}
        del resume["Content-Type"]
        resume["Accept"] = "text/event-stream"
        answer: dict[str, Any] | None = None
        async with asyncio.timeout(5):
            # The upstream sees the first request end only once the proxy closes it; until
            # then a resumed stream has no live tail and ends at once. Asked again until it
            # stays open: the tool has not finished, so only a live tail can carry its result.
            while answer is None:
                replayed: list[str] = []
                async with s.get(proxy.base + "/mcp", headers=resume) as r:
                    assert r.status == 200, await r.text()
                    async for event in events(r):
                        replayed.append(event.get("data", ""))
                        if not event.get("data"):
                            # the priming event: the stream is the live tail
                            resumable.release.set()
                            continue
                        message = orjson.loads(event["data"])
                        if message.get("id") == 2:
                            answer = message
                            break
                if answer is None:
                    await asyncio.sleep(0.05)
        assert answer["result"]["content"][0]["text"] == "done"
        assert "notifications/progress" in replayed[0]
    assert resumable.calls == ["slow"]


async def test_another_agent_cannot_resume_or_end_a_session_it_did_not_start(
    make_proxy: ProxyFactory, resumable: McpUpstream, keys: Keys
) -> None:
    # The session id and an event id are all the SDK's server asks for to replay a stream:
    # an agent that learns them (a log, a shared orchestrator) must not read another's
    # answers through the proxy, which alone knows who started the session.
    proxy = await make_proxy(
        policy=POLICY, upstream_url=resumable.url, upstream_extra="    protocol: mcp"
    )
    owner, other = keys.token("mcp-agent"), keys.token("other-bot")
    lookup = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "lookup", "arguments": {"id": "7"}},
    }
    async with aiohttp.ClientSession() as s:
        session = await start_session(s, proxy, owner)
        async with s.post(
            proxy.base + "/mcp", data=orjson.dumps(lookup), headers=headers(owner, session)
        ) as r:
            first = [event async for event in events(r)]
        resume = headers(other, session) | {"Last-Event-ID": first[0]["id"]}
        del resume["Content-Type"]
        resume["Accept"] = "text/event-stream"
        async with asyncio.timeout(5), s.get(proxy.base + "/mcp", headers=resume) as r:
            replayed: list[str] = []
            async for event in events(r) if r.status == 200 else _nothing():
                if event.get("data"):
                    replayed.append(event["data"])
                    break
            assert r.status == 403, replayed
        async with s.delete(proxy.base + "/mcp", headers=headers(other, session)) as r:
            assert r.status == 403
        # Nor in the spelling a CGI-style server reads as the same header.
        folded = headers(other) | {"Mcp_Session_Id": session}
        async with s.post(proxy.base + "/mcp", data=orjson.dumps(lookup), headers=folded) as r:
            assert r.status == 403
        # The owner's session is untouched.
        async with s.post(
            proxy.base + "/mcp", data=orjson.dumps(lookup), headers=headers(owner, session)
        ) as r:
            assert r.status == 200
            answered = [event.get("data", "") async for event in events(r)]
            assert any("record 7" in data for data in answered)
    assert resumable.calls == ["lookup", "lookup"]
