"""The sink contract, run on every sink (STYLE §10), and the Redis stream on a real server:
records readable with XRANGE, a chain that continues, bounded failures without passwords."""

from __future__ import annotations

import asyncio
import io
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import orjson
import pytest
import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agentproxy.audit import trail as trail_module
from agentproxy.audit.chain import Chain
from agentproxy.audit.settings import AuditSettings
from agentproxy.audit.sinks import AuditError, FileSink, RedisStreamSink, Sink, StdoutSink
from agentproxy.audit.trail import AuditTrail
from agentproxy.audit.verify import verify
from agentproxy.config.model import RedisSettings
from tests.audit.conftest import decision
from tests.harness.redis import MakeRedisServer


def xrange_lines(url: str, stream: str) -> list[bytes]:
    with redis.Redis.from_url(url) as client:
        return [fields[b"record"] for _, fields in client.xrange(stream)]


@dataclass
class Subject:
    sink: Sink
    read: Callable[[], list[bytes]]
    readable: bool  # whether `start` finds where a chain stands


@pytest.fixture(params=["file", "stdout", "redis"])
async def subject(request: pytest.FixtureRequest, log_path: Path) -> AsyncIterator[Subject]:
    if request.param == "file":
        sink: Sink = FileSink(log_path)
        yield Subject(sink, lambda: log_path.read_bytes().splitlines(), True)
    elif request.param == "stdout":
        stream = io.BytesIO()
        yield Subject(StdoutSink(stream), lambda: stream.getvalue().splitlines(), False)
    else:
        url: str = request.getfixturevalue("redis_url")
        name = f"audit-{uuid.uuid4().hex}"
        yield Subject(
            RedisStreamSink(name, RedisSettings(url=url)), lambda: xrange_lines(url, name), True
        )


async def test_a_sink_keeps_every_line_in_order(subject: Subject) -> None:
    chain = Chain("r1")
    first = [chain.seal_line(decision(n)).line for n in range(3)]
    second = [chain.seal_line(decision(n)).line for n in range(3, 700)]
    assert (await subject.sink.start("r1")).last is None
    await subject.sink.write(first)
    await subject.sink.write(second)
    await subject.sink.close()
    assert subject.read() == first + second


async def test_a_sink_says_where_a_chain_stands(subject: Subject) -> None:
    chain, other = Chain("r1"), Chain("r2")
    await subject.sink.start("r1")
    await subject.sink.write([chain.seal_line(decision(n)).line for n in range(5)])
    await subject.sink.close()
    if isinstance(subject.sink, RedisStreamSink):
        # heads are per chain: r2's writer (its own sink) leaves r1's alone
        await subject.sink.start("r2")
        await subject.sink.write([other.seal_line(decision(0)).line])
        await subject.sink.close()
    elif isinstance(subject.sink, FileSink):
        await subject.sink.start("r2")
        await subject.sink.write([other.seal_line(decision(0)).line])
        await subject.sink.close()
    resumed = await subject.sink.start("r1")
    await subject.sink.close()
    if subject.readable:
        assert resumed.last is not None
        assert (resumed.last["seq"], resumed.last["hash"]) == (4, chain.head)
    else:
        assert resumed.last is None


async def test_a_trail_writes_the_stream(
    redis_url: str, key_file: Path, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    settings = AuditSettings(
        redis_stream="agentproxy:audit",
        redis=RedisSettings(url=redis_url),
        signing_key_file=key_file,
        checkpoint_every=10,
        replica="pod-a",
    )
    for start in (0, 20):  # a restart continues the chain from the stream's head
        trail = AuditTrail(settings)
        await trail.start()
        await asyncio.gather(*(trail.submit(decision(n)) for n in range(start, start + 20)))
        await trail.close()
    streamed = xrange_lines(redis_url, "agentproxy:audit")
    assert [orjson.loads(line)["seq"] for line in streamed] == list(range(len(streamed)))
    exported = tmp_path / "stream.jsonl"
    exported.write_bytes(b"".join(line + b"\n" for line in streamed))
    report = verify([exported], signing_key.public_key())
    assert report.ok and report.notes == [], (report.problems, report.notes)
    assert report.chains == {"pod-a": len(streamed) - 1}


async def test_a_stream_that_joins_late_gets_a_gap_record(
    redis_url: str, log_path: Path, tmp_path: Path
) -> None:
    file_only = AuditSettings(file=log_path, replica="pod-a")
    trail = AuditTrail(file_only)
    await trail.start()
    await trail.submit(decision(0))
    await trail.close()
    both = AuditSettings(
        file=log_path, redis_stream="s", redis=RedisSettings(url=redis_url), replica="pod-a"
    )
    trail = AuditTrail(both)
    await trail.start()
    await trail.submit(decision(1))
    await trail.close()
    exported = tmp_path / "stream.jsonl"
    exported.write_bytes(b"".join(line + b"\n" for line in xrange_lines(redis_url, "s")))
    report = verify([exported], None)
    assert report.ok, report.problems
    assert report.notes[0].startswith(
        "stream.jsonl:1: records 0..0 were not written to every sink, as the writer recorded: "
        "redis:s: it held the chain only up to seq -1"
    )
    assert verify([log_path], None).ok


async def test_redis_failures_are_bounded_and_never_show_the_password(
    make_redis_server: MakeRedisServer, log_path: Path
) -> None:
    password = "pw-Sup3r-s3cret"
    server = make_redis_server(password=password)
    settings = AuditSettings(
        file=log_path,
        redis_stream="s",
        redis=RedisSettings(url=server.url, timeout=0.05),
        replica="pod-a",
    )
    trail = AuditTrail(settings)
    await trail.start()
    await trail.submit(decision(0))
    server.freeze()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(AuditError) as caught:
            await trail.submit(decision(1))
        assert loop.time() - started < 5
        assert "Timeout" in str(caught.value) and password not in str(caught.value)
        assert "***@127.0.0.1" in str(caught.value)
    finally:
        server.thaw()
    await asyncio.to_thread(server.stop)
    with pytest.raises(AuditError) as caught:
        await trail.submit(decision(2))
    assert password not in str(caught.value)
    assert trail.dropped == 2
    with pytest.raises(AuditError) as caught:
        await trail.close()  # the gap record cannot reach the stream either
    assert password not in str(caught.value)
    with pytest.raises(AuditError) as caught:
        await AuditTrail(settings).start()
    assert password not in str(caught.value) and "audit redis start failed" in str(caught.value)


def test_a_bad_redis_url_is_refused_without_its_password() -> None:
    with pytest.raises(AuditError) as caught:
        RedisStreamSink("s", RedisSettings(url="bogus://:pw-secret-1@host:1/0"))
    assert "pw-secret-1" not in str(caught.value)


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The descriptors the file sink fsyncs (the real fsync still runs)."""
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)  # the module the sink calls it through
    return calls


async def test_a_file_sink_fsyncs_every_batch_unless_told_to_defer(
    tmp_path: Path, fsyncs: list[int]
) -> None:
    every = FileSink(tmp_path / "every.jsonl")
    await every.start("c")
    fsyncs.clear()
    for n in range(3):
        await every.write([b'{"n":%d}' % n])
    assert len(fsyncs) == 3
    await every.close()

    deferred = FileSink(tmp_path / "deferred.jsonl", sync_every=60.0)
    await deferred.start("c")
    fsyncs.clear()
    for n in range(3):
        await deferred.write([b'{"n":%d}' % n])
    assert len(fsyncs) == 1  # the first batch; the next two are within the minute
    await deferred.sync()
    await deferred.sync()  # nothing left to sync
    assert len(fsyncs) == 2
    await deferred.close()
    assert (tmp_path / "deferred.jsonl").read_bytes().count(b"\n") == 3


async def test_a_deferring_file_sink_fsyncs_before_it_rotates(
    tmp_path: Path, fsyncs: list[int]
) -> None:
    path = tmp_path / "audit.jsonl"
    sink = FileSink(path, max_bytes=20, sync_every=60.0)
    await sink.start("c")
    await sink.write([b'{"n":1}'])
    fsyncs.clear()
    await sink.write([b'{"n":2}'])
    assert fsyncs == []
    await sink.write([b'{"n":3, "pad": "xxxxxxxx"}'])  # past max_bytes: rotates first
    assert len(fsyncs) >= 1
    rotated = [name for name in os.listdir(tmp_path) if name.startswith("audit.jsonl.2")]
    assert [(tmp_path / name).read_bytes() for name in rotated] == [b'{"n":1}\n{"n":2}\n']
    await sink.close()


@pytest.mark.parametrize("required", [False, True])
async def test_the_trail_fsyncs_each_batch_only_when_calls_wait(
    settings: AuditSettings,
    fsyncs: list[int],
    monkeypatch: pytest.MonkeyPatch,
    required: bool,
) -> None:
    """Without `required`, batches share an fsync at most a second apart, and an idle trail
    fsyncs what it wrote last; with it, every batch is on disk before its calls go on."""
    monkeypatch.setattr(trail_module, "SYNC_EVERY", 1.0)
    trail = AuditTrail(replace(settings, required=required, signing_key_file=None))
    await trail.start()
    fsyncs.clear()
    for n in range(3):
        await trail.submit(decision(n))  # one batch each: the trail is idle in between
    assert len(fsyncs) == (3 if required else 1)
    if not required:
        for _ in range(40):  # idle: what the last batches left is synced after SYNC_EVERY
            await asyncio.sleep(0.1)
            if len(fsyncs) == 2:
                break
        assert len(fsyncs) == 2
    await trail.close()


async def test_a_deferring_file_sink_appends_on_the_loop_and_leaves_the_disk_to_a_thread(
    tmp_path: Path, fsyncs: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain append goes to the page cache on the loop (a thread handoff per batch cost
    more than the write); whatever waits on the disk (an fsync, a rotation) still runs in a
    worker thread, and a file replaced behind the writer is still noticed."""
    threaded: list[str] = []
    to_thread = asyncio.to_thread

    async def counting(func: Callable[..., object], /, *args: object) -> object:
        threaded.append(getattr(func, "__name__", "?"))
        return await to_thread(func, *args)

    monkeypatch.setattr(asyncio, "to_thread", counting)  # the sink looks it up per call
    path = tmp_path / "audit.jsonl"
    sink = FileSink(path, max_bytes=60, sync_every=60.0)
    await sink.start("c")
    await sink.write([b'{"n":1}'])  # the first batch is fsynced: in a thread
    threaded.clear()
    await sink.write([b'{"n":2}'])
    await sink.write([b'{"n":3}'])
    assert threaded == [] and len(fsyncs) == 1

    path.rename(tmp_path / "moved.jsonl")  # replaced behind the writer's back
    await sink.write([b'{"n":4}'])
    assert (tmp_path / "moved.jsonl").read_bytes() == b'{"n":1}\n{"n":2}\n{"n":3}\n'
    assert path.read_bytes() == b'{"n":4}\n'

    threaded.clear()
    await sink.write([b'{"n":5, "pad": "%s"}' % (b"x" * 40)])  # past max_bytes: rotates
    assert threaded == ["_write"]
    await sink.sync()
    assert threaded == ["_write", "_sync"]
    await sink.close()
