"""The audit trail: records in, one hash chain per replica, batches out to every sink.

`submit(record)` snapshots the record (redacting the configured paths) and queues it;
`post(record)` queues a record its builder hands over, with no snapshot and no future (the
pipeline's two records per call). One writer task takes everything queued (up to
`BATCH_RECORDS`), seals it into the chain in queue order, and writes the batch to every sink at
once. With `required`, batching is by backlog, not by timer: an idle trail writes a record at
once, a busy one gathers what arrived during the last write (group commit), so a call never
waits on a timer, and every batch is fsynced. Without it, the writer also lingers `LINGER`
seconds after a batch's first record, so batches stay large at moderate load, and the file is
fsynced at most every `SYNC_EVERY` seconds (and that long after the last batch).

Sealing happens at write time, not at submit time, so the chain holds exactly what was handed
to the sinks, and a loss is itself on the record:

- A batch a sink refuses (or a record never written to a sink that joined late) becomes a gap
  in that sink: the next batch begins with a sealed `gap` record
  `{"kind": "gap", "missing_from", "missing_to", "reason", "sinks": {name: {missing_from,
  reason}}}`, written to every sink. `verify` accepts a sequence jump only at a gap record
  declaring exactly it, and reports it as a note; any other jump is a problem.
- A record the queue has no room for is never sealed: it is not in the chain, only counted.
  Either way the future fails with `AuditError`, `dropped` grows and `on_drop` is called, and
  the loss is logged at ERROR (at most every `LOG_EVERY` seconds per cause, with counts).

At start the chain continues where the sinks left it (the highest `seq` any sink holds); a
sink holding less gets a gap record for the difference, and what a sink repaired (an
incomplete last line moved aside) is sealed first as a `recovered` record. A chain nobody can
read back (stdout only) cannot be continued: it is named `<replica>@<start time>` instead, so
two runs never fork one chain. With a signing key, a checkpoint is sealed every
`checkpoint_every` records and a closing one at `close`; the file sink keeps the latest apart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agentproxy.audit.chain import SEALED_MEMBERS, Chain, Sealed, checkpoint, redact
from agentproxy.audit.keys import load_signing_key
from agentproxy.audit.settings import AuditSettings
from agentproxy.audit.sinks import (
    AuditError,
    FileSink,
    RedisStreamSink,
    Resume,
    Sink,
    StdoutSink,
    utc_stamp,
)
from agentproxy.clock import SYSTEM, Clock, rfc3339

log = logging.getLogger("agentproxy.audit")

BATCH_RECORDS = 512
LOG_EVERY = 5.0
# Without `required` nobody waits for a record, so the writer lets this long pass after a
# batch's first record: what arrives meanwhile shares its write and the writer's wake-ups.
# At a moderate rate every batch costs as much again as its sealing (the caches are cold by
# then): 20 ms instead of 5 took 11-17 µs of CPU off every call of the full pipeline at
# 2,800 calls/s (bench/http_overhead.py's fixed rate). With `required`, calls wait: no linger.
LINGER = 0.02
# A lingered batch is sealed this many records at a time, the event loop served in between:
# 20 ms of calls is ~110 records at 2,800 calls/s, ~0.7 ms of sealing that would otherwise
# hold back every call arriving meanwhile (their p99).
SEAL_CHUNK = 32
# Without `required`, the file is fsynced at most this often (and this long after the last
# batch once the trail goes idle): an fsync per batch put the disk's flush in the tail of
# every call on a small machine (bench/http_overhead.py's fixed-rate p90 and p99), and what
# is written is already safe from a crash of the proxy itself. With `required`, every batch.
SYNC_EVERY = 1.0
CONTROL_KINDS = frozenset({"checkpoint", "gap", "recovered"})

__all__ = ["AuditError", "AuditTrail"]


@dataclass(slots=True)
class _Entry:
    record: dict[str, Any]
    future: asyncio.Future[None] | None  # None: posted, nobody waits for it


@dataclass(slots=True)
class _Throttle:
    """Counts a recurring failure and says when it is time to log it again."""

    pending: int = 0
    logged_at: float = -LOG_EVERY

    def due(self, count: int, now: float) -> int:
        """Adds `count`; returns how many to report now (0: stay quiet). `now`: monotonic."""
        self.pending += count
        if now - self.logged_at < LOG_EVERY:
            return 0
        self.logged_at, count, self.pending = now, self.pending, 0
        return count


@dataclass(slots=True)
class _SinkState:
    sink: Sink
    missing_from: int | None = None  # first seq this sink lacks, until a gap record says so
    reason: str = ""
    throttle: _Throttle = field(default_factory=_Throttle)


class AuditTrail:
    """See the module docstring. `dropped` counts records that did not reach every sink."""

    def __init__(
        self,
        settings: AuditSettings,
        *,
        on_drop: Callable[[int], None] | None = None,
        clock: Clock = SYSTEM,
        stdout: BinaryIO | None = None,
    ) -> None:
        """Builds the sinks (nothing is opened before `start`) and reads the signing key.

        Raises ValueError if no sink is configured or the signing key file is unreadable or
        not Ed25519, AuditError if the Redis URL cannot be parsed.
        """
        if not settings.enabled:
            raise ValueError("audit: no sink configured (file, stdout or redis_stream)")
        self.settings = settings
        self.dropped = 0
        self._lost: dict[str, int] = {}  # reason → records dropped before they were sealed
        self._on_drop = on_drop
        self._clock = clock
        self._key: Ed25519PrivateKey | None = (
            load_signing_key(settings.signing_key_file) if settings.signing_key_file else None
        )
        sinks: list[Sink] = []
        if settings.file is not None:
            sinks.append(
                FileSink(
                    settings.file,
                    max_bytes=settings.max_file_bytes,
                    rotate_every=settings.rotate_every,
                    clock=clock,
                    sync_every=0.0 if settings.required else SYNC_EVERY,
                )
            )
        if settings.stdout:
            sinks.append(StdoutSink(stdout))
        if settings.redis_stream is not None:
            assert settings.redis is not None  # AuditSettings checks it
            sinks.append(RedisStreamSink(settings.redis_stream, settings.redis))
        self._sinks = [_SinkState(sink) for sink in sinks]
        self._queue: asyncio.Queue[_Entry | None] = asyncio.Queue(settings.queue_size)
        self._chain: Chain | None = None
        self._writer: asyncio.Task[None] | None = None
        self._running = False
        self._since_checkpoint = 0
        self._drops = _Throttle()
        self._linger = 0.0 if settings.required else LINGER

    @property
    def chain_id(self) -> str | None:
        """This writer's chain (known once started)."""
        return None if self._chain is None else self._chain.id

    @property
    def backlog(self) -> int:
        """Records queued and not yet written."""
        return self._queue.qsize()

    async def start(self) -> None:
        """Opens every sink, continues this replica's chain, writes what the sinks repaired,
        and starts the writer. Raises AuditError if a sink cannot be opened or written."""
        replica = self.settings.replica or f"{socket.gethostname()}-{os.getpid()}"
        readable = any(not isinstance(s.sink, StdoutSink) for s in self._sinks)
        chain_id = replica if readable else f"{replica}@{utc_stamp(self._clock.now())}"
        resumes: list[Resume] = []
        try:
            for state in self._sinks:
                resumes.append(await state.sink.start(chain_id))
        except AuditError:
            await self._close_sinks(self._sinks[: len(resumes)])
            raise
        self._chain = self._continue(chain_id, resumes)
        repaired = [record for resume in resumes for record in resume.recovered]
        sealed = self._seal_gap()
        sealed += [s for record in repaired for s in self._seal(self._control(record))]
        if sealed:
            failures = await self._write(sealed)
            if failures:
                await self._close_sinks(self._sinks)
                raise AuditError("; ".join(failures))
        self._running = True
        self._writer = asyncio.create_task(self._run(), name="audit-writer")

    def submit(self, record: dict[str, Any]) -> asyncio.Future[None]:
        """Queues `record` (a JSON-able dict; the trail adds `chain`, `seq`, `prev`, `hash`).

        The future resolves once every sink accepted it, or fails with AuditError: queue full,
        a sink refused it, the trail is not running, or the record is unusable (not JSON-able,
        a reserved member or kind). A failure counts as a drop. The failure is retrieved here,
        so a caller that does not await the future (audit not `required`) leaves no warning.
        Must be called on the event loop.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        if not self._running:
            return self._fail(future, "audit trail is not running")
        reserved = [name for name in SEALED_MEMBERS if name in record]
        kind = record.get("kind")
        if reserved or (isinstance(kind, str) and kind in CONTROL_KINDS):
            what = ", ".join(reserved) or f"kind {kind!r}"
            return self._fail(future, f"record carries what only the trail may write: {what}")
        try:
            if self.settings.redact:
                record = redact(record, self.settings.redact, self.settings.hmac_key)
            # A snapshot: the caller may go on changing its dicts, and the chain must hash
            # plain JSON types only (orjson does not sort a dataclass's fields).
            snapshot = orjson.loads(orjson.dumps(record))
        except TypeError as exc:
            return self._fail(future, f"record is not JSON-serializable: {exc}")
        try:
            self._queue.put_nowait(_Entry(snapshot, future))
        except asyncio.QueueFull:
            return self._fail(future, "queue full")
        return future

    def post(self, record: dict[str, Any]) -> None:
        """Queues a record nobody waits for, handed over by its builder (`audit.records`).

        The cheap path for the two records of every call: the caller gives the record up (it
        never changes it again, nested values included) and it holds JSON types only, so no
        snapshot is taken and no future made. A record that cannot be serialized or carries
        a sealed member is found when it is sealed, and is dropped there; every loss is
        counted and logged as `submit`'s are. Must be called on the event loop.
        """
        if not self._running:
            self._lose(1, "audit trail is not running")
            return
        kind = record.get("kind")
        if isinstance(kind, str) and kind in CONTROL_KINDS:
            self._lose(1, f"record carries what only the trail may write: kind {kind!r}")
            return
        if self.settings.redact:
            try:
                record = redact(record, self.settings.redact, self.settings.hmac_key)
            except TypeError as exc:
                self._lose(1, f"record is not JSON-serializable: {exc}")
                return
        try:
            self._queue.put_nowait(_Entry(record, None))
        except asyncio.QueueFull:
            self._lose(1, "queue full")

    async def close(self) -> None:
        """Writes everything queued, then a closing checkpoint (with a signing key), and
        closes the sinks. Raises AuditError if that last write or a sink's close fails."""
        if not self._running:
            return
        self._running = False
        assert self._writer is not None
        await self._queue.put(None)
        try:
            await self._writer
        finally:
            failures: list[str] = []
            sealed = self._seal_gap()
            if self._key is not None and self._chain is not None:
                sealed += self._seal(
                    self._control(checkpoint(self._chain, self._key, closing=True))
                )
            if sealed:
                failures += await self._write(sealed)
            failures += await self._close_sinks(self._sinks)
        if failures:
            raise AuditError("; ".join(failures))

    async def _run(self) -> None:
        queue = self._queue
        unsynced = False
        while True:
            try:
                async with asyncio.timeout(SYNC_EVERY if unsynced else None):
                    entry = await queue.get()
            except TimeoutError:  # idle since the last batch: make it durable now
                await self._sync_sinks()
                unsynced = False
                continue
            if entry is None:
                return
            if self._linger and queue.qsize() < BATCH_RECORDS:
                await asyncio.sleep(self._linger)
            batch = [entry]
            closing = False
            while len(batch) < BATCH_RECORDS and not queue.empty():
                following = queue.get_nowait()
                if following is None:
                    closing = True
                    break
                batch.append(following)
            try:
                await self._write_batch(batch)
            except Exception:
                log.exception("audit: writing a batch failed unexpectedly")
                self._settle(batch, "internal error while writing (see the log)")
            if closing:
                return
            unsynced = not self.settings.required

    async def _sync_sinks(self) -> None:
        """The idle trail's deferred fsync. A failure is logged: the records are written,
        only their durability is in doubt, and the next batch tries again."""
        for state in self._sinks:
            try:
                await state.sink.sync()
            except AuditError as exc:
                if state.throttle.due(1, self._clock.monotonic()):
                    log.error("audit: %s", exc)

    async def _write_batch(self, batch: list[_Entry]) -> None:
        sealed = self._seal_gap()
        kept = []
        for index, entry in enumerate(batch):
            if index and not index % SEAL_CHUNK:
                await asyncio.sleep(0)
            try:
                sealed += self._seal(entry.record)
            except (TypeError, ValueError) as exc:  # a posted record: see `post`
                self._reject(entry, f"record cannot be sealed: {exc}")
                continue
            kept.append(entry)
        if not sealed:
            return
        failures = await self._write(sealed)
        self._settle(kept, "; ".join(failures) if failures else None)

    def _reject(self, entry: _Entry, reason: str) -> None:
        self._lose(1, reason)
        if entry.future is not None and not entry.future.done():
            entry.future.set_exception(AuditError(reason))

    def _settle(self, batch: list[_Entry], failure: str | None) -> None:
        if failure is not None:
            self._count_drops(len(batch), failure)
        for entry in batch:
            future = entry.future
            if future is None or future.done():
                continue
            if failure is None:
                future.set_result(None)
            else:
                future.set_exception(AuditError(failure))

    async def _write(self, sealed: list[Sealed]) -> list[str]:
        """Hands the lines to every sink at once; returns the failures, one per sink."""
        lines = [s.line for s in sealed]
        outcomes = await asyncio.gather(
            *(state.sink.write(lines) for state in self._sinks), return_exceptions=True
        )
        first, last = sealed[0].seq, sealed[-1].seq
        checkpoints = [s for s in sealed if s.record.get("kind") == "checkpoint"]
        failures: list[str] = []
        for state, outcome in zip(self._sinks, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome
                failures.append(self._sink_failed(state, outcome, first, last))
                continue
            if state.missing_from is not None:
                log.warning(
                    "audit: %s writes again; records %d..%d it missed are recorded as a gap",
                    state.sink.name,
                    state.missing_from,
                    first - 1,
                )
                state.missing_from, state.reason = None, ""
            if checkpoints:
                try:
                    latest = checkpoints[-1]
                    await state.sink.save_checkpoint(latest.record["chain"], latest.line)
                except AuditError as exc:
                    log.error("audit: %s", exc)
        return failures

    def _sink_failed(self, state: _SinkState, exc: Exception, first: int, last: int) -> str:
        reason = str(exc) if isinstance(exc, AuditError) else f"{type(exc).__name__}: {exc}"
        if state.missing_from is None:
            state.missing_from = first
        state.reason = reason
        count = state.throttle.due(last - first + 1, self._clock.monotonic())
        if count:
            log.error(
                "audit: %s did not take %d record(s) (missing since seq %d): %s",
                state.sink.name,
                count,
                state.missing_from,
                reason,
                exc_info=None if isinstance(exc, AuditError) else exc,
            )
        return reason

    def _seal(self, record: dict[str, Any]) -> list[Sealed]:
        """Seals the record, and a checkpoint after it when one is due."""
        assert self._chain is not None
        sealed = [self._chain.seal_line(record)]
        if record.get("kind") == "checkpoint":
            self._since_checkpoint = 0
            return sealed
        self._since_checkpoint += 1
        if self._key is not None and self._since_checkpoint >= self.settings.checkpoint_every:
            sealed += self._seal(self._control(checkpoint(self._chain, self._key)))
        return sealed

    def _seal_gap(self) -> list[Sealed]:
        """A gap record for the sinks that missed records, sealed right after the last of them
        (every such sink missed everything up to the chain's head)."""
        assert self._chain is not None
        sealed: list[Sealed] = []
        if self._lost:
            lost, self._lost = self._lost, {}
            sealed += self._seal(
                self._control(
                    {
                        "kind": "gap",
                        "dropped": sum(lost.values()),
                        "reason": "; ".join(f"{n} {why}" for why, n in lost.items()),
                    }
                )
            )
        lacking = [s for s in self._sinks if s.missing_from is not None]
        if not lacking:
            return sealed
        sinks = {s.sink.name: {"missing_from": s.missing_from, "reason": s.reason} for s in lacking}
        gap = {
            "kind": "gap",
            "missing_from": min(s.missing_from for s in lacking if s.missing_from is not None),
            "missing_to": self._chain.next_seq - 1,
            "reason": "; ".join(f"{name}: {s['reason']}" for name, s in sinks.items()),
            "sinks": sinks,
        }
        return sealed + self._seal(self._control(gap))

    def _continue(self, chain_id: str, resumes: list[Resume]) -> Chain:
        """The chain after the highest record any sink holds; sinks holding less lack the
        rest, which the first gap record declares."""
        lasts = [r.last for r in resumes if r.last is not None]
        if not lasts:
            return Chain(chain_id)
        head = max(lasts, key=lambda r: int(r["seq"]))
        for state, resume in zip(self._sinks, resumes, strict=True):
            have = -1 if resume.last is None else int(resume.last["seq"])
            if have < head["seq"]:
                state.missing_from = have + 1
                state.reason = f"it held the chain only up to seq {have} when the writer started"
                log.error("audit: %s %s", state.sink.name, state.reason)
        return Chain(chain_id, int(head["seq"]) + 1, str(head["hash"]))

    def _control(self, record: dict[str, Any]) -> dict[str, Any]:
        return {**record, "time": rfc3339(self._clock.now(), 6)}

    def _fail(self, future: asyncio.Future[None], reason: str) -> asyncio.Future[None]:
        self._lose(1, reason)
        future.set_exception(AuditError(reason))
        return future

    def _lose(self, count: int, reason: str) -> None:
        """Records that never got a seq: the next write seals a `gap` record saying how many
        and why, so a loss is in the chain itself and `verify` reports it."""
        self._lost[reason] = self._lost.get(reason, 0) + count
        self._count_drops(count, reason)

    def _count_drops(self, count: int, reason: str) -> None:
        self.dropped += count
        if self._on_drop is not None:
            try:
                self._on_drop(count)
            except Exception:
                log.exception("audit: the on_drop callback failed")
        reported = self._drops.due(count, self._clock.monotonic())
        if reported:
            log.error("audit: dropped %d record(s), %d in all: %s", reported, self.dropped, reason)

    async def _close_sinks(self, states: list[_SinkState]) -> list[str]:
        failures: list[str] = []
        for state in states:
            try:
                await state.sink.close()
            except AuditError as exc:
                log.error("audit: %s", exc)
                failures.append(str(exc))
        return failures


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
