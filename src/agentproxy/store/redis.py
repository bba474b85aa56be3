"""The shared store: one Redis for every sidecar replica of a deployment.

Keys, all under `RedisSettings.key_prefix`:

- `limit:<key>:<window start>`: the float counter of one fixed window, expiring a few seconds
  after the window ends.
- `revocations`: a hash, `<kind>:<subject>` → JSON `{kind, subject, until, reason}` (`until`
  null means for good).
- `epoch`: a random marker naming the current lifetime of this Redis's data (see Durability).
- `task:<task>`: a hash with `calls`, `spent` and one `label:<name>` field per label, expiring
  `ttl` seconds after the task's last call. One key rather than a hash and a set: a separate
  `task:<t>:labels` set would be the very key of task `<t>:labels`'s hash.

Time: windows and revocation expiry use the caller's `now`, never Redis `TIME`, so replicas and
`MemoryStore` agree on which window a call falls in. Key expiry uses relative TTLs, so skew
between a replica's clock and Redis's only shifts when memory is reclaimed.

Bounds: the socket timeouts bound each wait and `asyncio.timeout(timeout * 4)` bounds each
round trip's sum of them (a pool wait, a connect, and after a restart `EVALSHA` → `NOSCRIPT`
→ `SCRIPT LOAD` → `EVALSHA`); `revocations()` makes up to three such round trips when it
re-applies. Any Redis error, socket error or timeout raises `StoreError` naming the operation
and the redacted URL, never the password. redis-py does not retry: a command may already have
run when its reply is lost, and a retried `INCRBYFLOAT` would count twice. A pooled connection
the server closed (a restart) is replaced before use, so recovery needs no failed call.

Durability:

- Counters and task history live in Redis memory only. A Redis restart without persistence
  resets them: a window's budget may be spent again, a task forgets its labels. Accepted: they
  are short-lived, and the alternative is making every call wait on a disk.
- A revocation must never silently vanish. Each `RedisStore` mirrors the revocations Redis held
  at its last read plus those it wrote since, and remembers the `epoch` marker it saw. When
  `revocations()` finds the marker missing or changed (Redis restarted empty, was flushed, or
  failed over to an empty replica), it writes its active mirrored revocations back (`HSETNX`:
  a revocation written since the restart wins) and sets a new marker. So as long as any one
  replica stays up across a Redis restart, every revocation returns within one refresh of that
  replica; until then, the other replicas do not see it.
- Not covered: if Redis and every replica restart together, revocations survive only through
  Redis persistence. Run Redis with `appendonly yes`. Also use `maxmemory-policy noeviction`
  or a `volatile-*` policy: counters and tasks carry TTLs, while revocations and the marker do
  not, and an `allkeys-*` policy could evict them without the marker changing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.maint_notifications import MaintNotificationsConfig
from redis.typing import EncodableT, FieldT

from agentproxy.config.model import RedisSettings, redact_url
from agentproxy.store.base import (
    ApprovalGrant,
    LimitExceeded,
    Reservation,
    Revocation,
    StoreError,
    TaskHistory,
    window_start,
)

log = logging.getLogger("agentproxy.store")

# A round trip's socket waits in the worst case; see "Bounds" above.
BOUND_FACTOR = 4
# How long a window's counter outlives the window: a replica whose clock lags still finds the
# counter its peers filled, instead of starting the window afresh.
WINDOW_MARGIN = 5.0

# Checking every counter before taking any is what makes a multi-limit call all-or-nothing;
# doing it in one script is what keeps concurrent callers from overspending between the check
# and the charge (FIELD-NOTES: BerriAI/litellm#34732).
# KEYS[i]: the counter of reservation i in the current window.
# ARGV[3i-2], ARGV[3i-1], ARGV[3i]: its amount, its limit, milliseconds the counter must live.
# Returns 0 when all were taken, else {i, used} for the first that does not fit.
_RESERVE = """
for i, key in ipairs(KEYS) do
  local used = redis.call('GET', key) or '0'
  if tonumber(used) + tonumber(ARGV[3 * i - 2]) > tonumber(ARGV[3 * i - 1]) then
    return {i, used}
  end
end
for i, key in ipairs(KEYS) do
  redis.call('INCRBYFLOAT', key, ARGV[3 * i - 2])
  redis.call('PEXPIRE', key, ARGV[3 * i])
end
return 0
"""

# ARGV[i]: the (negative) amount given back to KEYS[i]. A counter never goes below zero, and a
# counter that is gone (its window is over) stays gone. INCRBYFLOAT and KEEPTTL keep the expiry.
_RELEASE = """
for i, key in ipairs(KEYS) do
  local used = redis.call('GET', key)
  if used then
    if tonumber(used) + tonumber(ARGV[i]) <= 0 then
      redis.call('SET', key, '0', 'KEEPTTL')
    else
      redis.call('INCRBYFLOAT', key, ARGV[i])
    end
  end
end
return 0
"""

# KEYS: the revocations hash, the epoch marker. ARGV[1]: a new marker; then field, JSON pairs.
# HSETNX: a revocation written since the restart (a newer decision) is not overwritten. SET NX:
# when several replicas re-apply at once, the first marker stays and the others adopt it.
_REAPPLY = """
for i = 2, #ARGV, 2 do
  redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('SET', KEYS[2], ARGV[1], 'NX')
return redis.call('GET', KEYS[2])
"""

# KEYS[1]: the revocations hash; ARGV: field, JSON pairs read as expired. Compare-and-delete,
# so a revocation that replaced an expired one since it was read is not deleted with it.
_PRUNE = """
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return 0
"""

# KEYS[1]: the grant hash. ARGV[1]: now (seconds). Returns the grant's JSON as it was before
# this use, or false. A one-use grant is deleted by the use that takes it, in the same script,
# so of N concurrent callers exactly one gets it.
_USE_GRANT = """
local grant = redis.call('GET', KEYS[1])
if not grant then return false end
local g = cjson.decode(grant)
if tonumber(g['expires']) <= tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  return false
end
if g['uses'] ~= cjson.null then
  if tonumber(g['uses']) <= 1 then
    redis.call('DEL', KEYS[1])
  else
    local left = cjson.decode(grant)
    left['uses'] = tonumber(g['uses']) - 1
    redis.call('SET', KEYS[1], cjson.encode(left), 'KEEPTTL')
  end
end
return grant
"""

_RevocationKey = tuple[str, str]


class RedisStore:
    """The `Store` protocol on Redis; see the module docstring for keys, bounds, durability."""

    def __init__(self, settings: RedisSettings) -> None:
        """Builds the connection pool (nothing connects before `start`).

        Raises StoreError if the URL cannot be parsed.
        """
        self._prefix = settings.key_prefix
        self._bound = settings.timeout * BOUND_FACTOR
        self._where = redact_url(settings.url)
        self._secrets = _secrets_in(settings.url)
        try:
            pool = BlockingConnectionPool.from_url(
                settings.url,
                max_connections=settings.pool_size,
                # Waiting for a free connection is bounded like everything else.
                timeout=self._bound,
                socket_timeout=settings.timeout,
                socket_connect_timeout=settings.timeout,
                retry=Retry(NoBackoff(), 0),
                # With maintenance notifications (on by default for RESP3), redis-py stops
                # checking a pooled connection for the server's close before reusing it, so the
                # first calls after a Redis restart would fail; it also relaxes timeouts to
                # seconds during a "maintenance". We need neither.
                maint_notifications_config=MaintNotificationsConfig(enabled=False),
                decode_responses=True,
            )
        except ValueError as exc:
            raise StoreError(self._scrub(f"invalid redis url {self._where}: {exc}")) from None
        self._redis: Redis = Redis.from_pool(pool)
        self._reserve = self._redis.register_script(_RESERVE)
        self._release = self._redis.register_script(_RELEASE)
        self._reapply = self._redis.register_script(_REAPPLY)
        self._prune = self._redis.register_script(_PRUNE)
        self._use_grant = self._redis.register_script(_USE_GRANT)
        self._revocations_key = f"{self._prefix}revocations"
        self._epoch_key = f"{self._prefix}epoch"
        self._epoch: str | None = None
        self._mirror: dict[_RevocationKey, Revocation] = {}
        # Revocations this store wrote, with the sequence number of each write, kept until a
        # read that began after the write completed: that read is sure to contain it.
        self._written: dict[_RevocationKey, tuple[int, Revocation]] = {}
        self._writes = 0

    async def start(self) -> None:
        """Pings Redis, joins (or begins) the current epoch and loads the revocation mirror.

        Raises StoreError if Redis is unreachable or refuses.
        """
        async with self._bounded("start"):
            await self._redis.ping()
            pipe = self._redis.pipeline(transaction=True)
            pipe.set(self._epoch_key, secrets.token_hex(16), nx=True)
            pipe.get(self._epoch_key)
            pipe.hgetall(self._revocations_key)
            _, epoch, raw = await pipe.execute()
            revocations = _parse_revocations(raw)
        self._epoch = epoch
        self._mirror = {(r.kind, r.subject): r for r in revocations.values()}

    async def close(self) -> None:
        """Closes every pooled connection. Raises StoreError if that fails."""
        async with self._bounded("close"):
            await self._redis.aclose()

    async def revoke(self, revocation: Revocation) -> None:
        """Adds or replaces the revocation of `(kind, subject)`. Raises StoreError."""
        key = (revocation.kind, revocation.subject)
        async with self._bounded("revoke"):
            await self._redis.hset(self._revocations_key, _field(key), _encode(revocation))
        self._writes += 1
        self._written[key] = (self._writes, revocation)
        self._mirror[key] = revocation

    async def revocations(self, now: float) -> list[Revocation]:
        """Every revocation active at `now`; re-applies the mirror first if Redis lost its data.

        Raises StoreError.
        """
        began = self._writes
        async with self._bounded("revocations"):
            epoch, raw = await self._read_revocations()
        if epoch is None or epoch != self._epoch:
            async with self._bounded("revocations (re-applying after a redis restart)"):
                epoch, raw = await self._reapply_mirror(epoch, now)
        async with self._bounded("revocations"):
            revocations = _parse_revocations(raw)
            expired = [
                part
                for field, r in revocations.items()
                if not r.active(now)
                for part in (field, raw[field])
            ]
            if expired:
                await self._prune(keys=[self._revocations_key], args=expired)
        active = [r for r in revocations.values() if r.active(now)]
        self._epoch = epoch
        self._mirror = {(r.kind, r.subject): r for r in active}
        for key, (seq, revocation) in list(self._written.items()):
            if seq > began:
                self._mirror[key] = revocation
            else:
                del self._written[key]
        return active

    async def reserve(
        self, reservations: Iterable[Reservation], now: float
    ) -> LimitExceeded | None:
        """Atomically takes every reservation in its current window, or none of them.

        Returns the first that does not fit (nothing is taken then), or None. Raises StoreError.
        """
        wanted = list(reservations)
        if not wanted:
            return None
        keys: list[str] = []
        args: list[str] = []
        for r in wanted:
            start = window_start(now, r.window)
            keys.append(self._counter(r, start))
            lifetime = math.ceil((start + r.window - now + WINDOW_MARGIN) * 1000)
            args += [repr(float(r.amount)), repr(float(r.limit)), str(lifetime)]
        async with self._bounded("reserve"):
            result = await self._reserve(keys=keys, args=args)
            if result == 0:
                return None
            index, used = int(result[0]), float(result[1])
        r = wanted[index - 1]
        start = window_start(now, r.window)
        return LimitExceeded(r.name, used, r.limit, start + r.window - now)

    async def release(self, reservations: Iterable[Reservation], now: float) -> None:
        """Gives back reservations taken in the window that contains `now`, never going below
        zero. Raises StoreError."""
        given = list(reservations)
        if not given:
            return
        keys = [self._counter(r, window_start(now, r.window)) for r in given]
        args = [repr(-float(r.amount)) for r in given]
        async with self._bounded("release"):
            await self._release(keys=keys, args=args)

    async def put_grant(self, grant: ApprovalGrant, now: float) -> None:
        """Stores the grant under `grant:<fingerprint>`, expiring with it. Raises StoreError."""
        ttl_ms = max(1, math.ceil((grant.expires - now) * 1000))
        body = orjson.dumps(
            {
                "fingerprint": grant.fingerprint,
                "approval_id": grant.approval_id,
                "expires": grant.expires,
                "uses": grant.uses,
                "approver": grant.approver,
            }
        )
        async with self._bounded("put_grant"):
            await self._redis.set(self._grant_key(grant.fingerprint), body, px=ttl_ms)

    async def use_grant(self, fingerprint: str, now: float) -> ApprovalGrant | None:
        """Uses the grant once, atomically (one Lua script). Raises StoreError."""
        async with self._bounded("use_grant"):
            raw = await self._use_grant(keys=[self._grant_key(fingerprint)], args=[repr(now)])
        if not raw:
            return None
        try:
            data = orjson.loads(raw)
            return ApprovalGrant(
                fingerprint=str(data["fingerprint"]),
                approval_id=str(data["approval_id"]),
                expires=float(data["expires"]),
                uses=None if data["uses"] is None else int(data["uses"]),
                approver=str(data.get("approver", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            # Fail closed: a grant that cannot be read grants nothing.
            raise StoreError(f"unreadable grant for {fingerprint[:16]}…: {exc}") from None

    def _grant_key(self, fingerprint: str) -> str:
        return f"{self._prefix}grant:{fingerprint}"

    async def task_history(self, task: str, now: float) -> TaskHistory:
        """The history of `task` (empty if unknown or expired). `now` is unused: the key's TTL
        expires it. Raises StoreError."""
        async with self._bounded("task_history"):
            # decode_responses=True: every reply is str.
            fields = cast(dict[str, str], await self._redis.hgetall(self._task_key(task)))
            if not fields:
                return TaskHistory()
            labels = frozenset(k[6:] for k in fields if k.startswith("label:"))
            return TaskHistory(labels, int(fields.get("calls", 0)), float(fields.get("spent", 0)))

    async def record_task(
        self, task: str, labels: Iterable[str], spent: float, ttl: float, now: float
    ) -> None:
        """Counts one call of `task`, adds its labels and spend, and restarts its `ttl`, all in
        one transaction. Raises StoreError."""
        key = self._task_key(task)
        added: dict[FieldT, EncodableT] = {f"label:{label}": 1 for label in labels}
        async with self._bounded("record_task"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.hincrby(key, "calls", 1)
            pipe.hincrbyfloat(key, "spent", float(spent))
            if added:
                pipe.hset(key, mapping=added)
            # A TTL of zero or less deletes the key, as MemoryStore forgets it at once.
            pipe.pexpire(key, math.ceil(ttl * 1000))
            await pipe.execute()

    async def _read_revocations(self) -> tuple[str | None, dict[str, str]]:
        pipe = self._redis.pipeline(transaction=True)
        pipe.get(self._epoch_key)
        pipe.hgetall(self._revocations_key)
        epoch, raw = await pipe.execute()
        return epoch, raw

    async def _reapply_mirror(
        self, seen: str | None, now: float
    ) -> tuple[str | None, dict[str, str]]:
        active = [r for r in self._mirror.values() if r.active(now)]
        pairs = [part for r in active for part in (_field((r.kind, r.subject)), _encode(r))]
        epoch = await self._reapply(
            keys=[self._revocations_key, self._epoch_key],
            args=[secrets.token_hex(16), *pairs],
        )
        if self._epoch is not None:
            log.warning(
                "redis at %s lost its data (epoch marker %s): re-applied %d revocation(s) "
                "from this replica",
                self._where,
                "missing" if seen is None else "changed",
                len(active),
            )
        _, raw = await self._read_revocations()
        return epoch, raw

    @asynccontextmanager
    async def _bounded(self, operation: str) -> AsyncIterator[None]:
        """Bounds the block in time. Raises StoreError on a timeout, a Redis or socket error,
        or a reply that cannot be parsed."""
        try:
            async with asyncio.timeout(self._bound):
                yield
        except TimeoutError:
            # Before OSError, of which TimeoutError is a subclass.
            raise StoreError(
                self._scrub(f"redis {operation} timed out after {self._bound:g}s ({self._where})")
            ) from None
        except (RedisError, OSError, ValueError) as exc:
            raise StoreError(
                self._scrub(
                    f"redis {operation} failed ({self._where}): {type(exc).__name__}: {exc}"
                )
            ) from exc

    def _scrub(self, message: str) -> str:
        # redact_url hides the userinfo; this also covers a password given as `?password=`
        # and any echo of it in a server's error.
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return message

    def _counter(self, reservation: Reservation, start: float) -> str:
        # The window start never contains ":", so the key is unambiguous however the
        # reservation's key is spelled.
        return f"{self._prefix}limit:{reservation.key}:{start:.17g}"

    def _task_key(self, task: str) -> str:
        return f"{self._prefix}task:{task}"


def _field(key: _RevocationKey) -> str:
    return f"{key[0]}:{key[1]}"


def _encode(revocation: Revocation) -> str:
    # JSON has no infinity (orjson writes null for every non-finite float): null is "for good",
    # and a never-active -inf or NaN is stored as the earliest time there is.
    until: float | None = revocation.until
    if until == math.inf:
        until = None
    elif not math.isfinite(revocation.until):
        until = -sys.float_info.max
    return orjson.dumps(
        {
            "kind": revocation.kind,
            "subject": revocation.subject,
            "until": until,
            "reason": revocation.reason,
        }
    ).decode()


def _parse_revocations(raw: dict[str, str]) -> dict[str, Revocation]:
    """The revocations of the hash, by field. Raises ValueError (a StoreError once bounded) for
    an entry that is not a revocation: failing closed, as skipping it could let a revoked agent
    through."""
    revocations = {}
    for field, text in raw.items():
        try:
            entry: Any = orjson.loads(text)
            until = math.inf if entry["until"] is None else float(entry["until"])
            revocations[field] = Revocation(
                entry["kind"], entry["subject"], until, str(entry["reason"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed revocation {field!r}: {exc}") from None
    return revocations


def _secrets_in(url: str) -> list[str]:
    parts = urlsplit(url)
    found = [parts.password or ""]
    found += parse_qs(parts.query).get("password", [])
    found += [unquote(s) for s in found]
    # Longest first, so a secret containing another is replaced whole.
    return sorted({s for s in found if s}, key=len, reverse=True)
