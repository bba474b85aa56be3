"""The body worker: large bodies are read on its thread, at most MAX_PER_AGENT of an agent's
at a time, and a caller that hangs up does not free its share before the parse ends."""

from __future__ import annotations

import asyncio
import threading
import traceback
import weakref
from collections.abc import Callable

import pytest

from agentproxy.errors import BadRequest, LimitRefused
from agentproxy.protocols.strict_json import JsonError
from agentproxy.proxy.offload import INLINE_BYTES, MAX_PER_AGENT, BodyReader, parse_off_loop


def holding(release: threading.Event, started: threading.Event | None = None) -> Callable[[], str]:
    def read() -> str:
        if started is not None:
            started.set()
        release.wait(10)
        return threading.current_thread().name

    return read


async def test_an_agent_holds_at_most_its_share_and_others_are_not_refused() -> None:
    reader = BodyReader()
    release = threading.Event()
    try:
        mine = [asyncio.create_task(reader.run("flood", holding(release))) for _ in range(2)]
        await asyncio.sleep(0)
        assert reader.held("flood") == MAX_PER_AGENT
        with pytest.raises(LimitRefused) as refused:
            await reader.run("flood", holding(release))
        assert refused.value.limit == "large-bodies-in-flight"
        assert refused.value.headers["Retry-After"] == "1"
        other = asyncio.create_task(reader.run("good", holding(release)))
        await asyncio.sleep(0)
        assert reader.held("good") == 1
    finally:
        release.set()
    names = await asyncio.gather(*mine, other)
    assert all(name.startswith("agentproxy-body") for name in names)
    assert reader.held("flood") == reader.held("good") == 0


async def test_hanging_up_frees_the_share_only_when_the_parse_ends() -> None:
    reader = BodyReader()
    release, started = threading.Event(), threading.Event()
    running = asyncio.create_task(reader.run("a", holding(release, started)))
    queued = asyncio.create_task(reader.run("a", holding(release)))
    await asyncio.to_thread(started.wait, 10)
    running.cancel()
    queued.cancel()  # never started: its share is free at once
    await asyncio.gather(running, queued, return_exceptions=True)
    assert reader.held("a") == 1  # the running parse still holds its share
    release.set()
    for _ in range(100):
        if reader.held("a") == 0:
            break
        await asyncio.sleep(0.01)
    assert reader.held("a") == 0


async def test_faults_come_back_and_free_the_share() -> None:
    reader = BodyReader()

    def bad() -> None:
        raise BadRequest("parse error: nope")

    with pytest.raises(BadRequest, match="nope"):
        await reader.run("a", bad)
    assert reader.held("a") == 0


async def test_small_plain_bodies_are_read_on_the_loop() -> None:
    loop_thread = threading.current_thread().name

    def where() -> str:
        return threading.current_thread().name

    assert await parse_off_loop("a", b"x" * INLINE_BYTES, None, where) == loop_thread
    assert await parse_off_loop("a", b"x" * INLINE_BYTES, " Identity", where) == loop_thread
    assert (await parse_off_loop("a", b"x" * (INLINE_BYTES + 1), None, where)).startswith(
        "agentproxy-body"
    )
    # A few bytes of gzip may inflate to the cap: always the worker's.
    assert (await parse_off_loop("a", b"x", "gzip", where)).startswith("agentproxy-body")


async def test_a_refused_body_is_freed_on_the_worker_not_on_the_loop() -> None:
    class Document:
        pass

    kept: list[weakref.ref[Document]] = []

    def read() -> None:
        document = Document()
        kept.append(weakref.ref(document))
        try:
            raise JsonError("more than 10 values")
        except JsonError:
            raise BadRequest("parse error: more than 10 values") from None

    with pytest.raises(BadRequest) as caught:
        await BodyReader().run("a", read)
    # Nothing the loop holds (the refusal, its traceback, its context) keeps the document.
    assert kept[0]() is None
    assert "read" not in [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
