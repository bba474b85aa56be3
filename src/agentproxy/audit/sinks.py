"""Where sealed audit lines go: an append-only JSONL file, stdout, a Redis stream.

Every sink takes whole batches (`write(lines)`, one JSON document per line, no newlines) and
either accepts all of them or raises `AuditError`; I/O that may wait on a disk or a pipe runs
in a thread, so the event loop never does. (The one exception: the file's plain appends while
an fsync is deferred, which only copy into the page cache.) `start(chain)` opens the sink and
says where the chain stands in it (`Resume`), so that a restarted writer continues its chain
instead of forking it.

The file (`FileSink`), and the files next to it:

- `audit.jsonl`: the current file, appended to once per batch and fsynced after each batch,
  or at most `sync_every` seconds apart (the trail asks for that when no call waits for its
  record: a write is in the OS at once, so a crashed proxy loses nothing written; the disk
  has it within the second). One process writes it: `audit.jsonl.lock` is held (`flock`)
  while it is open, and a second writer is refused rather than left to interleave or rotate
  under the first. Give each worker its own file.
- `audit.jsonl.20250102T030405.123456Z`: a rotated file, renamed when the current one would
  pass `max_file_bytes`, or at the first write in a new `rotate_every` period (periods are
  aligned to UTC epoch multiples, so 3600 rotates on the hour, also across restarts). The name
  is the UTC time of the rotation at fixed width, so sorting names gives chain order. The chain
  simply continues in the new file.
- `audit.jsonl.checkpoint`: the latest checkpoint record of each chain in this file,
  `{chain: record}`, replaced atomically (temporary file, fsync, rename). It lives apart from
  the log so that cutting the log's tail *with* its last checkpoint is still detected.
- `audit.jsonl.<time>.fragment`: an incomplete last line found at start (the previous writer
  died mid-write, or the disk filled), moved out of the log before the log is truncated to its
  last complete line. The trail then seals a `recovered` record saying so.

If the current file is moved, replaced or deleted behind the writer's back, the next batch
notices (the inode changed), says so loudly, and opens the path anew; if the path cannot be
opened (it became a directory, the disk is read-only), the batch fails. A failed batch is
truncated away, so the next one never lands after half a line.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import logging
import math
import os
import re
import stat
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.maint_notifications import MaintNotificationsConfig

from agentproxy.clock import SYSTEM, Clock
from agentproxy.config.model import RedisSettings, redact_url

log = logging.getLogger("agentproxy.audit")

_BLOCK = 64 * 1024
_STAMP = "%Y%m%dT%H%M%S.%fZ"
_ROTATED = re.compile(r"\.\d{8}T\d{6}\.\d{6}Z")


class AuditError(Exception):
    """An audit record could not be written (or a sink could not be opened)."""


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a chain stands in a sink when it opens.

    `last`: the chain's last record the sink holds (at least `seq` and `hash`), None if none.
    `recovered`: records for the trail to seal first, each saying what the sink repaired.
    """

    last: dict[str, Any] | None = None
    recovered: tuple[dict[str, Any], ...] = ()


class Sink(Protocol):
    name: str

    async def start(self, chain: str) -> Resume:
        """Opens the sink. Raises AuditError."""
        ...

    async def write(self, lines: list[bytes]) -> None:
        """Appends every line or raises AuditError."""
        ...

    async def sync(self) -> None:
        """Makes what was written durable, if the sink defers that. Raises AuditError."""
        ...

    async def save_checkpoint(self, chain: str, line: bytes) -> None:
        """Keeps the latest checkpoint of `chain` apart from the log. Raises AuditError."""
        ...

    async def close(self) -> None:
        """Raises AuditError."""
        ...


def utc_stamp(t: float) -> str:
    """`t` as fixed-width UTC text that sorts in time order: 20250102T030405.123456Z."""
    return datetime.fromtimestamp(t, UTC).strftime(_STAMP)


def rotated_files(path: Path) -> list[Path]:
    """The rotated files of the log at `path`, oldest first."""
    pattern = re.compile(re.escape(path.name) + _ROTATED.pattern + r"\Z")
    try:
        names = sorted(entry.name for entry in os.scandir(path.parent) if pattern.match(entry.name))
    except FileNotFoundError:
        return []
    return [path.parent / name for name in names]


class FileSink:
    """Append-only JSONL with rotation; see the module docstring for the files it keeps."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 100 * 2**20,
        rotate_every: float | None = None,
        clock: Clock = SYSTEM,
        sync_every: float = 0.0,
    ) -> None:
        """`sync_every`: 0 fsyncs every batch; more lets batches within that many seconds of
        the last fsync skip theirs (then `sync` or the next due batch catches up)."""
        self.path = Path(path)
        self.name = f"file:{self.path}"
        self.checkpoint_path = Path(f"{self.path}.checkpoint")
        self._max_bytes = max_bytes
        self._rotate_every = rotate_every
        self._clock = clock
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._inode: tuple[int, int] = (0, 0)
        self._committed = 0
        self._torn = False
        self._period: int | None = None
        self._sync_every = sync_every
        self._synced_at = -math.inf
        self._unsynced = False

    async def start(self, chain: str) -> Resume:
        """Locks and opens the file, moves an incomplete last line aside, and finds `chain`'s
        last record (in this file or the newest rotated one, or else in the checkpoint file).

        Raises AuditError if the file cannot be opened or another process writes it.
        """
        try:
            return await asyncio.to_thread(self._start, chain)
        except OSError as exc:
            await asyncio.to_thread(self._close)
            raise AuditError(f"audit file {self.path}: cannot open: {_why(exc)}") from None

    async def write(self, lines: list[bytes]) -> None:
        """Appends the lines and fsyncs when due. Raises AuditError (and cuts off what got
        in)."""
        data = b"\n".join(lines) + b"\n"
        if self._appends_only(len(data)):
            # Into the page cache, on the loop: a thread handoff per batch (the GIL passed
            # back and forth for every system call in it) cost several times the write.
            self._write(data)
            return
        await asyncio.to_thread(self._write, data)

    async def sync(self) -> None:
        """Fsyncs what earlier writes left unsynced. Raises AuditError."""
        if not self._unsynced:
            return
        try:
            await asyncio.to_thread(self._sync)
        except OSError as exc:
            raise AuditError(f"audit file {self.path}: fsync failed: {_why(exc)}") from None

    async def save_checkpoint(self, chain: str, line: bytes) -> None:
        """Replaces `chain`'s entry in the checkpoint file atomically. Raises AuditError."""
        try:
            await asyncio.to_thread(self._save_checkpoint, chain, line)
        except OSError as exc:
            raise AuditError(f"audit checkpoint file {self.checkpoint_path}: {_why(exc)}") from None

    async def close(self) -> None:
        """Fsyncs and closes the file and releases the lock. Raises AuditError."""
        try:
            await asyncio.to_thread(self._close, True)
        except OSError as exc:
            raise AuditError(f"audit file {self.path}: close failed: {_why(exc)}") from None

    def _appends_only(self, incoming: int) -> bool:
        """Whether writing `incoming` bytes now waits on nothing but the page cache: no fsync,
        rotation or failed batch to cut off is due (the path replaced behind the writer is
        found only while writing, and is rare enough to take its fsync on the loop)."""
        return (
            self._fd is not None
            and not self._torn
            and not self._sync_due()
            and not self._rotation_due(incoming, self._clock.now())
        )

    def _sync_due(self) -> bool:
        return self._clock.monotonic() - self._synced_at >= self._sync_every

    def _rotation_due(self, incoming: int, now: float) -> bool:
        return bool(self._committed) and (
            self._committed + incoming > self._max_bytes
            or (self._rotate_every is not None and self._period_of(now) != self._period)
        )

    # The rest runs in a worker thread, one call at a time (the trail awaits each), except
    # the plain appends `write` makes on the loop.

    def _start(self, chain: str) -> Resume:
        lock_path = f"{self.path}.lock"
        self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(
                errno.EBUSY,
                f"another process writes it (it holds {lock_path}); give each writer its own file",
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.write(self._lock_fd, f"{os.getpid()}\n".encode())
        self._open()
        recovered: list[dict[str, Any]] = []
        fragment = self._recover_fragment()
        if fragment is not None:
            recovered.append(fragment)
        last = self._last_record(chain)
        saved = self._read_checkpoints().get(chain)
        if saved is not None and _position(saved) is not None:
            have = -1 if last is None else last["seq"]
            if saved["seq"] > have:
                detail = (
                    f"{self.path.name} ends at seq {have} of chain {chain}, but "
                    f"{self.checkpoint_path.name} holds its checkpoint at seq {saved['seq']}: "
                    f"records up to it are missing from the log; continuing after the checkpoint"
                )
                log.error("audit: %s", detail)
                recovered.append({"kind": "recovered", "detail": detail})
                last = saved
        return Resume(last, tuple(recovered))

    def _open(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file")
        self._fd = fd
        self._inode = (st.st_dev, st.st_ino)
        self._committed = st.st_size
        self._torn = False
        self._period = self._period_of(st.st_mtime) if st.st_size else None

    def _recover_fragment(self) -> dict[str, Any] | None:
        """Moves bytes after the last newline to a `.fragment` file and truncates them away."""
        assert self._fd is not None
        size = self._committed
        if size == 0 or os.pread(self._fd, 1, size - 1) == b"\n":
            return None
        end = _last_newline(self._fd, size) + 1
        fragment_path = self._unique(self._clock.now(), ".fragment")
        digest = hashlib.sha256()
        out = os.open(fragment_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            for offset in range(end, size, _BLOCK):
                chunk = os.pread(self._fd, min(_BLOCK, size - offset), offset)
                digest.update(chunk)
                _write_all(out, chunk)
            os.fsync(out)
        finally:
            os.close(out)
        # The fragment is safe on disk before it leaves the log.
        os.ftruncate(self._fd, end)
        os.fsync(self._fd)
        _fsync_dir(self.path.parent)
        self._committed = end
        detail = (
            f"{self.path.name} ended in an incomplete line ({size - end} bytes after byte "
            f"{end}: the previous writer stopped mid-record); moved to {fragment_path.name}"
        )
        log.error("audit: %s", detail)
        return {
            "kind": "recovered",
            "detail": detail,
            "fragment": fragment_path.name,
            "fragment_bytes": size - end,
            "fragment_sha256": digest.hexdigest(),
        }

    def _last_record(self, chain: str) -> dict[str, Any] | None:
        """`chain`'s last record in the current file, else in the newest rotated file (the
        writer may have rotated just before it stopped)."""
        assert self._fd is not None
        found = _last_of_chain(self._fd, self._committed, chain)
        if found is not None:
            return found
        older = rotated_files(self.path)
        if not older:
            return None
        fd = os.open(older[-1], os.O_RDONLY | os.O_CLOEXEC)
        try:
            return _last_of_chain(fd, os.fstat(fd).st_size, chain)
        finally:
            os.close(fd)

    def _read_checkpoints(self) -> dict[str, Any]:
        try:
            saved = orjson.loads(self.checkpoint_path.read_bytes())
        except FileNotFoundError:
            return {}
        except orjson.JSONDecodeError as exc:
            log.error(
                "audit: %s is not valid JSON (%s); it will be replaced", self.checkpoint_path, exc
            )
            return {}
        if not isinstance(saved, dict):
            log.error("audit: %s is not a JSON object; it will be replaced", self.checkpoint_path)
            return {}
        return saved

    def _write(self, data: bytes) -> None:
        try:
            fd = self._current(len(data))
            size = os.fstat(fd).st_size
            if size > self._committed and self._torn:
                # A failed batch could not be cut off then: it must be now, so that this one
                # starts on a fresh line.
                os.ftruncate(fd, self._committed)
            elif size != self._committed:
                log.error(
                    "audit: %s changed size behind the writer (%d bytes, expected %d)",
                    self.path,
                    size,
                    self._committed,
                )
                self._committed = size
            self._torn = True
            _write_all(fd, data)
            if self._sync_due():
                self._sync()
            else:
                self._unsynced = True
        except OSError as exc:
            self._cut_torn_batch()
            raise AuditError(f"audit file {self.path}: write failed: {_why(exc)}") from None
        self._torn = False
        self._committed += len(data)

    def _sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
        self._synced_at = self._clock.monotonic()
        self._unsynced = False

    def _cut_torn_batch(self) -> None:
        # Whatever part of the failed batch got in is removed (best effort; else before the
        # next write): the trail records the whole batch as a gap.
        if self._fd is None or not self._torn:
            return
        try:
            os.ftruncate(self._fd, self._committed)
            self._torn = False
        except OSError as exc:
            log.error("audit: cannot cut a failed batch off %s: %s", self.path, _why(exc))

    def _current(self, incoming: int) -> int:
        """The descriptor to write `incoming` bytes to: reopened if the path no longer names
        our file, rotated first if due. Raises OSError."""
        if self._fd is not None:
            try:
                st = os.stat(self.path)
                inode: tuple[int, int] | None = (st.st_dev, st.st_ino)
            except FileNotFoundError:
                inode = None
            if inode != self._inode:
                log.error(
                    "audit: %s was moved, replaced or deleted behind the writer; "
                    "writing to the path anew",
                    self.path,
                )
                self._sync()  # what went to the old file stays whole wherever it is now
                os.close(self._fd)
                self._fd = None
        if self._fd is None:
            self._open()
        now = self._clock.now()
        if self._rotation_due(incoming, now):
            self._rotate(now)
        if self._period is None:
            self._period = self._period_of(now)
        assert self._fd is not None
        return self._fd

    def _rotate(self, now: float) -> None:
        assert self._fd is not None
        target = self._unique(now, "")
        self._sync()  # a rotated file is complete on disk before it gets its final name
        os.rename(self.path, target)
        _fsync_dir(self.path.parent)
        os.close(self._fd)
        self._fd = None
        self._period = None
        self._open()
        log.info("audit: rotated %s to %s", self.path, target.name)

    def _unique(self, t: float, suffix: str) -> Path:
        # Two rotations in one microsecond (a clock step back) must not overwrite a file:
        # os.rename replaces silently. A later stamp keeps the names in order.
        while True:
            candidate = Path(f"{self.path}.{utc_stamp(t)}{suffix}")
            if not candidate.exists():
                return candidate
            t += 1e-6

    def _period_of(self, t: float) -> int | None:
        return None if self._rotate_every is None else int(t // self._rotate_every)

    def _save_checkpoint(self, chain: str, line: bytes) -> None:
        saved = self._read_checkpoints()
        saved[chain] = orjson.loads(line)
        temporary = Path(f"{self.checkpoint_path}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            _write_all(fd, orjson.dumps(saved, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.checkpoint_path)
        _fsync_dir(self.path.parent)

    def _close(self, sync: bool = False) -> None:
        fd, self._fd = self._fd, None
        lock_fd, self._lock_fd = self._lock_fd, None
        try:
            if fd is not None:
                if sync:
                    os.fsync(fd)
                os.close(fd)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)  # releases the flock


class StdoutSink:
    """JSON lines on stdout (or `stream`), for a cluster's log shipper. It cannot be read
    back, so a chain written only here starts afresh at each start (see `AuditTrail`)."""

    name = "stdout"

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer

    async def start(self, chain: str) -> Resume:
        return Resume()

    async def write(self, lines: list[bytes]) -> None:
        """Raises AuditError if the stream is closed or broken."""
        await asyncio.to_thread(self._write, b"\n".join(lines) + b"\n")

    async def save_checkpoint(self, chain: str, line: bytes) -> None:
        return None

    async def sync(self) -> None:
        return None  # every write is flushed

    async def close(self) -> None:
        """Raises AuditError."""
        await asyncio.to_thread(self._write, b"")

    def _write(self, data: bytes) -> None:
        try:
            if data:
                self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError) as exc:
            raise AuditError(f"audit stdout: write failed: {exc}") from None


class RedisStreamSink:
    """`XADD <stream> MAXLEN ~ maxlen * record <line>` per line, in one MULTI per batch, and
    the batch's last line in the hash `<stream>:heads` under the chain id, so that a restarted
    writer finds where its chain stands without scanning the stream.

    Bounds: like the store, no retries (a retried XADD could add a record twice) and every
    round trip bounded; but at least `MIN_TIMEOUT` per socket wait, since a batch is up to a
    few hundred KB and only `required` audit makes a call wait on it. Errors name the redacted
    URL, never a password.
    """

    MIN_TIMEOUT = 0.5
    BOUND_FACTOR = 4

    def __init__(self, stream: str, settings: RedisSettings, *, maxlen: int = 1_000_000) -> None:
        """Builds the pool (nothing connects before `start`). Raises AuditError for a URL that
        cannot be parsed."""
        self.stream = stream
        self.name = f"redis:{stream}"
        self._heads = f"{stream}:heads"
        self._maxlen = maxlen
        self._chain = ""
        timeout = max(settings.timeout, self.MIN_TIMEOUT)
        self._bound = timeout * self.BOUND_FACTOR
        self._where = redact_url(settings.url)
        self._secrets = _secrets_in(settings.url)
        try:
            pool = BlockingConnectionPool.from_url(
                settings.url,
                max_connections=2,
                timeout=self._bound,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
                # As in the store: keep the close check on pooled connections after a restart.
                maint_notifications_config=MaintNotificationsConfig(enabled=False),
            )
        except ValueError as exc:
            raise AuditError(self._scrub(f"invalid redis url {self._where}: {exc}")) from None
        self._redis: Redis = Redis.from_pool(pool)

    async def start(self, chain: str) -> Resume:
        """Pings Redis and reads the chain's head. Raises AuditError."""
        self._chain = chain
        async with self._bounded("start"):
            await self._redis.ping()
            raw = await self._redis.hget(self._heads, chain)
        if raw is None:
            return Resume()
        try:
            last = orjson.loads(raw)
        except orjson.JSONDecodeError:
            last = None
        if _position(last) is None:
            log.error("audit: %s holds a malformed head for chain %s", self._heads, chain)
            return Resume()
        return Resume(last)

    async def write(self, lines: list[bytes]) -> None:
        """Adds the lines to the stream in one transaction. Raises AuditError."""
        async with self._bounded("write"):
            pipe = self._redis.pipeline(transaction=True)
            for line in lines:
                pipe.xadd(self.stream, {"record": line}, maxlen=self._maxlen, approximate=True)
            pipe.hset(self._heads, self._chain, lines[-1])
            await pipe.execute()

    async def save_checkpoint(self, chain: str, line: bytes) -> None:
        return None

    async def sync(self) -> None:
        return None  # XADD answers once Redis has the entry; its durability is Redis's

    async def close(self) -> None:
        """Closes the pool. Raises AuditError."""
        async with self._bounded("close"):
            await self._redis.aclose()

    @asynccontextmanager
    async def _bounded(self, operation: str) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._bound):
                yield
        except TimeoutError:
            raise AuditError(
                f"audit redis {operation} timed out after {self._bound:g}s ({self._where})"
            ) from None
        except (RedisError, OSError) as exc:
            raise AuditError(
                self._scrub(
                    f"audit redis {operation} failed ({self._where}): {type(exc).__name__}: {exc}"
                )
            ) from None

    def _scrub(self, message: str) -> str:
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return message


def _secrets_in(url: str) -> list[str]:
    # As the store's: the userinfo password and a `?password=`, raw and unquoted, longest first.
    parts = urlsplit(url)
    found = [parts.password or "", *parse_qs(parts.query).get("password", [])]
    found += [unquote(s) for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)


def _position(record: Any) -> dict[str, Any] | None:
    """The record if it can continue a chain (an int `seq` and a str `hash`), else None."""
    if (
        isinstance(record, dict)
        and type(record.get("seq")) is int
        and isinstance(record.get("hash"), str)
    ):
        return record
    return None


def _last_of_chain(fd: int, size: int, chain: str) -> dict[str, Any] | None:
    # Only lines holding the member's exact bytes are parsed: a scan past other chains'
    # records stays a memory search.
    needle = b'"chain":' + orjson.dumps(chain)
    for line in _lines_backward(fd, size):
        if needle not in line:
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            log.warning("audit: skipping a malformed line while looking for chain %s", chain)
            continue
        if isinstance(record, dict) and record.get("chain") == chain and _position(record):
            return record
    return None


def _lines_backward(fd: int, size: int) -> Iterator[bytes]:
    """The non-empty lines of the first `size` bytes of `fd`, last first."""
    position, partial = size, b""
    while position > 0:
        step = min(_BLOCK, position)
        position -= step
        lines = (os.pread(fd, step, position) + partial).split(b"\n")
        partial = lines[0]
        yield from (line for line in reversed(lines[1:]) if line)
    if partial:
        yield partial


def _last_newline(fd: int, size: int) -> int:
    """The offset of the last newline before `size`, or -1."""
    position = size
    while position > 0:
        step = min(_BLOCK, position)
        position -= step
        found = os.pread(fd, step, position).rfind(b"\n")
        if found >= 0:
            return position + found
    return -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    # A rename or truncation is durable only once the directory entry is.
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)
