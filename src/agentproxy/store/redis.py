"""The shared store: one Redis (a single server, Sentinel's master, or a Cluster; Valkey too,
see `store/topology.py`) for every sidecar replica of a deployment.

Keys, all under `RedisSettings.key_prefix` (P). On a Cluster, the keys that scripts touch
together — revocations, epoch, grants, approvals and their sets — are under `{P}` instead (a
hash tag: one slot, whatever an id holds); counters, take markers and tasks stay under P,
spread over the slots, a take's marker in its counters' slot (`take:{<n>}:…`).

- `limit:<key>:<window start>`: the float counter of one fixed window, expiring a few seconds
  after the window ends.
- `revocations`: a hash, `<kind>:<subject>` → JSON `{kind, subject, until, reason}` (`until`
  null means for good).
- `epoch`: a random marker naming the current lifetime of this Redis's data (see Durability).
- `task:<task>`: a hash with `calls`, `spent` and one `label:<name>` field per label, expiring
  `ttl` seconds after the task's last call. One key rather than a hash and a set: a separate
  `task:<t>:labels` set would be the very key of task `<t>:labels`'s hash.
- `grant:<fingerprint>`: an `ApprovalGrant` as JSON, expiring with it.
- `approval:<id>`: a hash: `json` (the approval as created), its mutable `state`,
  `decided_by`, `decided_reason`, `decided_at`, and the copies the scripts read (`fingerprint`,
  `agent`, `created`, `expires`, `grant_ttl`). Numbers are Python `repr`s, so they round-trip
  exactly (Lua's cjson would keep 14 digits). It expires `expires - created` after its window
  for retries closes: `2 * (expires - created)` after its decision (after `expires` for one
  that expired).
- `approval-fp:<fingerprint>`: the id of the fingerprint's latest approval, expiring with it.
- `approvals:pending` and `approvals:pending:agent:<agent>`: sorted sets of pending ids,
  scored by `expires`; the caps count their members not yet overdue.
- `approvals:all`: a sorted set of every approval id, scored by `created`, for listing.
  Members whose record expired are dropped by the next list or open that meets them.
- `take:<random>:<n>`: a reservation's marker, `taken` or `cancelled`, for a minute (see
  "Refused calls").
- Channel `approvals:changed`: every change of an approval (created, decided, expired)
  publishes its id. Channel `revocations:changed`: every revocation written publishes its
  field, and each replica's mirror re-reads at once.

Approvals: every operation is one Lua script, which first expires the overdue pending
approvals it meets (the lifecycle's `pending --expire--> expired`, decided_at = expires) and
publishes them. `decide_approval` carries the lifecycle table into Lua, generated from
`lifecycle.TRANSITIONS` so the two cannot drift. The scripts build keys from the prefix they
are given and name the pending set among their KEYS, which routes them on a Cluster to the
one slot all those keys share. `wait_approval` costs no thread: each store holds ONE
subscription to `approvals:changed` and `revocations:changed` (a background task started by
the first wait, on its own connection; after a Sentinel failover it follows the master at
the next poll), which sets the events of
the ids it hears; after each (re)subscription and every `POLL_INTERVAL` it re-reads the state
of every waited-on approval in one pipelined round trip, so a decision published before the
subscription, or lost with a connection, still wakes its waiters within a second.

Time: windows and revocation expiry use the caller's `now`, never Redis `TIME`, so replicas and
`MemoryStore` agree on which window a call falls in. Key expiry uses relative TTLs, so skew
between a replica's clock and Redis's only shifts when memory is reclaimed.

Bounds: the socket timeouts bound each wait and `asyncio.timeout(timeout * 4)` bounds each
round trip's sum of them (a connect, and after a restart `EVALSHA` → `NOSCRIPT` → `SCRIPT
LOAD` → `EVALSHA`), after a wait of up to `pool_timeout` for one of the `pool_size`
connections (opened at start); `revocations()` makes up to three such round trips when it
re-applies. Any Redis error, socket error or timeout raises `StoreError` naming the operation
and the redacted URL, never the password. redis-py does not retry: a command may already have
run when its reply is lost, and a retried `INCRBYFLOAT` would count twice. A pooled connection
the server closed (a restart) is replaced before use, so recovery needs no failed call.

Refused calls are not charged: a reservation's script also sets a marker key (`take:<random>`,
in the counters' slot on a Cluster, living `MARKER_MS`). When a call is refused after it took
(a later slot does not fit) or its round trip fails (a timeout: the script may still run, as
a Redis that froze runs what it had received when it thaws), the store cancels the take: a
script gives back what the marker says was taken and leaves the marker `cancelled`, so a take
that runs afterwards takes nothing. While Redis does not answer, the cancel is retried in the
background every `CANCEL_RETRY` seconds until the window is over, and given up on `close`.

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
- Pending approvals survive a proxy restart (they live in Redis, not in the replica), and a
  Redis restart only with persistence. They carry TTLs, so under memory pressure a `volatile-*`
  policy may evict them: prefer `noeviction`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import secrets
import sys
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, replace
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

from agentproxy.approvals.lifecycle import (
    TRANSITIONS,
    Approval,
    Event,
    IllegalTransition,
    State,
    Vote,
    advance,
)
from agentproxy.config.model import RedisSettings
from agentproxy.store.base import (
    PAGE_LIMIT,
    PAGE_SCAN,
    ApprovalGrant,
    ApprovalPage,
    Counter,
    LimitExceeded,
    Reservation,
    Revocation,
    StoreError,
    TaskHistory,
    decode_cursor,
    encode_cursor,
)
from agentproxy.store.topology import Topology

log = logging.getLogger("agentproxy.store")

# A round trip's socket waits in the worst case; see "Bounds" above.
BOUND_FACTOR = 4
# How long a window's counter outlives the window: a replica whose clock lags still finds the
# counter its peers filled, instead of starting the window afresh.
WINDOW_MARGIN = 5.0
# Approvals: at most this many returned by one list, records examined by one list of decided
# ones, and overdue pending approvals expired by one call (the rest by the next calls).
LIST_LIMIT = 1000
LIST_SCAN = 10_000
SWEEP = 100
# How long a take's marker lives (ms): past any freeze a refused take is cancelled within.
MARKER_MS = "60000"
# The pause between attempts to give back a refused call's reservation while Redis is down.
CANCEL_RETRY = 0.5
# How often waiters are re-checked by reading, in case a notification was lost; also the pause
# before resubscribing after the subscription failed.
POLL_INTERVAL = 1.0
# The pause before the first resubscription after a subscription failed.
RESUBSCRIBE_AT_ONCE = 0.05
# Waiters re-checked per pipelined round trip: redis-py (8.2+) packs a pipeline of 1,000
# commands or more in a worker thread, and the watcher runs on the event loop alone.
RECHECK_BATCH = 500

# Checking every counter before taking any is what makes a multi-limit call all-or-nothing;
# doing it in one script is what keeps concurrent callers from overspending between the check
# and the charge (FIELD-NOTES: BerriAI/litellm#34732).
# KEYS[1]: this take's marker (see "Refused calls" above); KEYS[i + 1]: the counter of
# reservation i in the current window. ARGV[1]: the marker's lifetime in ms; ARGV[3i-1],
# ARGV[3i], ARGV[3i+1]: reservation i's amount, its limit, milliseconds the counter must live.
# Returns 0 when all were taken, else {i, used} for the first that does not fit, or -1 when
# the take was cancelled before it ran (its caller gave up on it: nothing is taken).
_RESERVE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
for i = 1, #KEYS - 1 do
  local used = redis.call('GET', KEYS[i + 1]) or '0'
  if tonumber(used) + tonumber(ARGV[3 * i - 1]) > tonumber(ARGV[3 * i]) then
    return {i, used}
  end
end
for i = 1, #KEYS - 1 do
  redis.call('INCRBYFLOAT', KEYS[i + 1], ARGV[3 * i - 1])
  redis.call('PEXPIRE', KEYS[i + 1], ARGV[3 * i + 1])
end
redis.call('SET', KEYS[1], 'taken', 'PX', ARGV[1])
return 0
"""

# Gives back what a counter holds for a take, never below zero; a counter that is gone (its
# window is over) stays gone. INCRBYFLOAT and KEEPTTL keep the expiry.
_GIVE_BACK = """
local function give_back(key, amount)
  local used = redis.call('GET', key)
  if used then
    if tonumber(used) + tonumber(amount) <= 0 then
      redis.call('SET', key, '0', 'KEEPTTL')
    else
      redis.call('INCRBYFLOAT', key, amount)
    end
  end
end
"""

# ARGV[i]: the (negative) amount given back to KEYS[i].
_RELEASE = (
    _GIVE_BACK
    + """
for i, key in ipairs(KEYS) do give_back(key, ARGV[i]) end
return 0
"""
)

# KEYS[1]: a take's marker, KEYS[i + 1] its counters; ARGV[1]: the marker's lifetime in ms,
# ARGV[i + 1]: the (negative) amount given back to counter i. Gives back only a take that
# ran and was not given back yet, and leaves the marker 'cancelled', so a take still on its
# way (sent before a freeze, run at the thaw) takes nothing. Returns 1 if it gave back.
_CANCEL = (
    _GIVE_BACK
    + """
local marker = redis.call('GET', KEYS[1])
if marker == 'cancelled' then return 0 end
if marker == 'taken' then
  for i = 1, #KEYS - 1 do give_back(KEYS[i + 1], ARGV[i + 1]) end
  redis.call('SET', KEYS[1], 'cancelled', 'KEEPTTL')
  return 1
end
redis.call('SET', KEYS[1], 'cancelled', 'PX', ARGV[1])
return 0
"""
)

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

# KEYS[1]: the revocations hash. ARGV: the field, its JSON, the channel that tells every
# replica (PUBLISH is broadcast to every node of a Cluster): written and told in one step.
_REVOKE = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 0
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

# KEYS: the epoch marker, the revocations hash. ARGV[1]: a marker, set if there is none.
# Returns {the marker, the hash's field, value list}: a store's start, in one round trip.
_OPEN = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return {redis.call('GET', KEYS[1]), redis.call('HGETALL', KEYS[2])}
"""

# KEYS: the epoch marker, the revocations hash. Returns {marker or '', field, value list}.
# A script rather than MULTI: redis-py's Cluster pipelines have no transactions.
_READ = """
return {redis.call('GET', KEYS[1]) or '', redis.call('HGETALL', KEYS[2])}
"""

# KEYS[1]: a task's hash. ARGV: calls, spend, TTL in ms, then the label fields to set.
_RECORD_TASK = """
redis.call('HINCRBY', KEYS[1], 'calls', ARGV[1])
redis.call('HINCRBYFLOAT', KEYS[1], 'spent', ARGV[2])
for i = 4, #ARGV do redis.call('HSET', KEYS[1], ARGV[i], 1) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 0
"""

# The lifecycle table, generated so that Lua applies exactly `lifecycle.TRANSITIONS`.
_TRANSITIONS_LUA = (
    "local TRANSITIONS = {\n"
    + "".join(
        f"  ['{state.value}:{event.value}'] = '{target.value}',\n"
        for (state, event), target in TRANSITIONS.items()
    )
    + "}\n"
)

# What every approval script shares. ARGV[1]: the key prefix; ARGV[2]: now (a Python repr).
# `meet` expires an overdue pending approval: it expired at `expires`, whoever notices it.
_APPROVAL_PRELUDE = (
    _TRANSITIONS_LUA
    + f"local SWEEP = {SWEEP}\n"
    + """
local P = ARGV[1]
local NOW_S = ARGV[2]
local NOW = tonumber(NOW_S)
local PENDING = P .. 'approvals:pending'
local ALL = P .. 'approvals:all'
local CHANGED = P .. 'approvals:changed'
local EXPIRED = TRANSITIONS['pending:expire']

local AGENTS = P .. 'approvals:pending:agents'
local function record_key(id) return P .. 'approval:' .. id end
local function agent_key(agent) return P .. 'approvals:pending:agent:' .. agent end
local function user_key(user) return P .. 'approvals:pending:user:' .. user end
local function rule_key(rule) return P .. 'approvals:pending:rule:' .. rule end
local function fp_key(fp) return P .. 'approval-fp:' .. fp end

local function ttl_at_least(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end

local function leave_pending(id, rec)
  redis.call('ZREM', PENDING, id)
  local f = redis.call('HMGET', rec, 'agent', 'user', 'rule')
  if f[1] then
    redis.call('ZREM', agent_key(f[1]), id)
    if redis.call('ZCARD', agent_key(f[1])) == 0 then redis.call('ZREM', AGENTS, f[1]) end
  end
  if f[2] and f[2] ~= '' then redis.call('ZREM', user_key(f[2]), id) end
  if f[3] then redis.call('ZREM', rule_key(f[3]), id) end
end

local function meet(id)
  local rec = record_key(id)
  local f = redis.call('HMGET', rec, 'state', 'expires')
  if not f[1] then
    redis.call('ZREM', PENDING, id)
    return false
  end
  if f[1] == 'pending' and tonumber(f[2]) <= NOW then
    redis.call('HSET', rec, 'state', EXPIRED, 'decided_at', f[2])
    leave_pending(id, rec)
    redis.call('PUBLISH', CHANGED, id)
    return EXPIRED
  end
  return f[1]
end

local function sweep()
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', PENDING, '-inf', NOW_S, 'LIMIT', 0, SWEEP)) do
    meet(id)
  end
end
"""
)

# ARGV[3..]: id, fingerprint, agent, created, expires, grant_ttl ('' for one use), the JSON,
# max pending, max pending for the agent, user ('' for none), rule, max pending for the user
# and for the rule (0: none). Returns {created 0/1, fields} or false (a cap). The caps are
# `store.base.admits`, applied here in the same order.
_OPEN_APPROVAL = (
    _APPROVAL_PRELUDE
    + """
local id, fp, agent, created_s, expires_s = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
sweep()
local found = redis.call('GET', fp_key(fp))
if found then
  local state = meet(found)
  if state == 'pending' then return {0, redis.call('HGETALL', record_key(found))} end
  -- An approved one whose grant is used up or lapsed is not found: the call asks anew.
  local spent = false
  if state == 'approved' then
    local grant = redis.call('GET', P .. 'grant:' .. fp)
    spent = not grant or tonumber(cjson.decode(grant)['expires']) <= NOW
  end
  if state and not spent then
    local f = redis.call('HMGET', record_key(found), 'decided_at', 'created', 'expires')
    if NOW < tonumber(f[1]) + (tonumber(f[3]) - tonumber(f[2])) then
      return {0, redis.call('HGETALL', record_key(found))}
    end
  end
end
local user, rule = ARGV[12], ARGV[13]
local max_total, max_agent = tonumber(ARGV[10]), tonumber(ARGV[11])
local max_user, max_rule = tonumber(ARGV[14]), tonumber(ARGV[15])
local per_agent, per_user, per_rule = agent_key(agent), user_key(user), rule_key(rule)
redis.call('ZREMRANGEBYSCORE', per_agent, '-inf', NOW_S)
redis.call('ZREMRANGEBYSCORE', AGENTS, '-inf', NOW_S)
local mine = redis.call('ZCARD', per_agent)
if mine >= max_agent then return false end
if user ~= '' and max_user > 0 then
  redis.call('ZREMRANGEBYSCORE', per_user, '-inf', NOW_S)
  if redis.call('ZCARD', per_user) >= max_user then return false end
end
if max_rule > 0 then
  redis.call('ZREMRANGEBYSCORE', per_rule, '-inf', NOW_S)
  if redis.call('ZCARD', per_rule) >= max_rule then return false end
end
local total = redis.call('ZCOUNT', PENDING, '(' .. NOW_S, '+inf')
if total >= max_total then
  local holders = redis.call('ZCARD', AGENTS)
  if not redis.call('ZSCORE', AGENTS, agent) then holders = holders + 1 end
  local share = math.max(1, math.floor(max_total / math.max(1, holders)))
  if total >= 2 * max_total or mine >= share then
    return false
  end
end
local expires = tonumber(expires_s)
local ms = math.max(1, math.ceil((expires - NOW + 2 * (expires - tonumber(created_s))) * 1000))
local rec = record_key(id)
redis.call('DEL', rec)
redis.call('HSET', rec, 'json', ARGV[9], 'state', 'pending', 'fingerprint', fp, 'agent', agent,
  'created', created_s, 'expires', expires_s, 'grant_ttl', ARGV[8], 'user', user, 'rule', rule)
redis.call('PEXPIRE', rec, ms)
redis.call('SET', fp_key(fp), id, 'PX', ms)
redis.call('ZADD', PENDING, expires_s, id)
redis.call('ZADD', per_agent, expires_s, id)
redis.call('ZADD', AGENTS, 'GT', expires_s, agent)  -- GT still adds a new member
if user ~= '' then
  redis.call('ZADD', per_user, expires_s, id)
  ttl_at_least(per_user, ms)
end
redis.call('ZADD', per_rule, expires_s, id)
redis.call('ZADD', ALL, created_s, id)
ttl_at_least(PENDING, ms)
ttl_at_least(per_agent, ms)
ttl_at_least(per_rule, ms)
ttl_at_least(AGENTS, ms)
ttl_at_least(ALL, ms)
for _, old in ipairs(redis.call('ZRANGE', ALL, 0, 9)) do
  if redis.call('EXISTS', record_key(old)) == 0 then redis.call('ZREM', ALL, old) end
end
redis.call('PUBLISH', CHANGED, id)
return {1, redis.call('HGETALL', rec)}
"""
)

# ARGV[3]: the id. Returns its fields or false.
_GET_APPROVAL = (
    _APPROVAL_PRELUDE
    + """
if not meet(ARGV[3]) then return false end
return redis.call('HGETALL', record_key(ARGV[3]))
"""
)

# ARGV[3]: the state ('' for all), ARGV[4]: at most this many, ARGV[5]: records to examine.
# Returns a list of field lists: pending ones that expire soonest, others oldest first.
_LIST_APPROVALS = (
    _APPROVAL_PRELUDE
    + """
local wanted, limit, scan = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
sweep()
local out = {}
if wanted == 'pending' then
  local ids = redis.call('ZRANGEBYSCORE', PENDING, '(' .. NOW_S, '+inf', 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    if meet(id) == 'pending' then out[#out + 1] = redis.call('HGETALL', record_key(id)) end
  end
  return out
end
local gone = {}
local start = 0
while #out < limit and start < scan do
  local ids = redis.call('ZRANGE', ALL, start, start + 99)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    local state = meet(id)
    if not state then
      gone[#gone + 1] = id
    elseif (wanted == '' or state == wanted) and #out < limit then
      out[#out + 1] = redis.call('HGETALL', record_key(id))
    end
  end
  start = start + 100
end
for _, id in ipairs(gone) do redis.call('ZREM', ALL, id) end
return out
"""
)

# ARGV[3]: the state ('' for all), ARGV[4]: at most this many, ARGV[5]: records to examine,
# ARGV[6], ARGV[7]: the cursor's score and id ('' for the first page). Pending ones come from
# PENDING (by expiry), the rest from ALL (by creation), in (score, id) order, as Redis orders
# equal scores by member. Returns {next cursor's score or '', its id, field lists}.
_PAGE_APPROVALS = (
    _APPROVAL_PRELUDE
    + """
local wanted, limit, scan = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local after_s, after_id = ARGV[6], ARGV[7]
sweep()
local key = ALL
if wanted == 'pending' then key = PENDING end
-- The rank of the first member after (s, id), whether or not (s, id) is still there.
local function rank_after(s, id)
  local n = redis.call('ZCOUNT', key, '-inf', '(' .. s)
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, s, s)) do
    if m <= id then n = n + 1 end
  end
  return n
end
local start = 0
if after_s ~= '' then start = rank_after(after_s, after_id) end
local out = {}
local examined = 0
local last_s, last_id = nil, nil
while #out < limit and examined < scan do
  local batch = redis.call('ZRANGE', key, start, start + 99, 'WITHSCORES')
  if #batch == 0 then break end
  for i = 1, #batch, 2 do
    if #out >= limit or examined >= scan then break end
    local id = batch[i]
    examined = examined + 1
    last_s, last_id = batch[i + 1], id
    local state = meet(id)
    if not state then
      redis.call('ZREM', key, id)
    elseif wanted == '' or state == wanted then
      out[#out + 1] = redis.call('HGETALL', record_key(id))
    end
  end
  start = rank_after(last_s, last_id)
end
if last_s == nil or redis.call('ZCARD', key) <= start then return {'', '', out} end
return {last_s, last_id, out}
"""
)

# ARGV[3..]: id, event, by, reason. Returns {'ok', fields}, {'unknown'}, {'illegal', state} or
# {'voted', votes still needed} (N of M: `by` already approved).
# On approve, the grant is written in the same script, in `put_grant`'s format: one use until
# the approval's own expiry, or any number until now + grant_ttl (formatted %.17g: exact).
_DECIDE_APPROVAL = (
    _APPROVAL_PRELUDE
    + """
local id, event, by, reason = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local state = meet(id)
if not state then return {'unknown'} end
local target = TRANSITIONS[state .. ':' .. event]
if not target then return {'illegal', state} end
local rec = record_key(id)
if state == 'pending' and event == 'approve' then
  -- N of M: a vote per distinct approver; the quorum's last one approves.
  local quorum = tonumber(cjson.decode(redis.call('HGET', rec, 'json')).quorum) or 1
  if quorum > 1 then
    local votes = cjson.decode(redis.call('HGET', rec, 'votes') or '[]')
    for _, vote in ipairs(votes) do
      if vote.by == by then return {'voted', tostring(quorum - #votes)} end
    end
    votes[#votes + 1] = {by = by, reason = reason, at = NOW}
    redis.call('HSET', rec, 'votes', cjson.encode(votes))
    if #votes < quorum then
      redis.call('PUBLISH', CHANGED, id)
      return {'ok', redis.call('HGETALL', rec)}
    end
  end
end
local f = redis.call('HMGET', rec, 'created', 'expires', 'fingerprint', 'grant_ttl')
redis.call('HSET', rec, 'state', target)
if state == 'pending' and target ~= 'pending' then
  redis.call('HSET', rec, 'decided_by', by, 'decided_reason', reason, 'decided_at', NOW_S)
  leave_pending(id, rec)
  local ms = math.max(1, math.ceil(2 * (tonumber(f[2]) - tonumber(f[1])) * 1000))
  redis.call('PEXPIRE', rec, ms)
  if redis.call('GET', fp_key(f[3])) == id then redis.call('PEXPIRE', fp_key(f[3]), ms) end
  ttl_at_least(ALL, ms)
end
if target == 'approved' then
  local expires_s, uses = f[2], '1'
  if f[4] ~= '' then
    expires_s, uses = string.format('%.17g', NOW + tonumber(f[4])), 'null'
  end
  local grant = '{"fingerprint":' .. cjson.encode(f[3]) .. ',"approval_id":' .. cjson.encode(id)
    .. ',"expires":' .. expires_s .. ',"uses":' .. uses .. ',"approver":' .. cjson.encode(by)
    .. '}'
  local ms = math.ceil((tonumber(expires_s) - NOW) * 1000)
  if ms > 0 then redis.call('SET', P .. 'grant:' .. f[3], grant, 'PX', ms) end
end
redis.call('PUBLISH', CHANGED, id)
return {'ok', redis.call('HGETALL', rec)}
"""
)

_RevocationKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class _Take:
    """One script's share of a reservation: its marker, counters and amounts to give back."""

    marker: str
    counters: list[str]
    back: list[str]


class RedisStore:
    """The `Store` protocol on Redis; see the module docstring for keys, bounds, durability."""

    def __init__(self, settings: RedisSettings) -> None:
        """Builds the connection pool (nothing connects before `start`).

        Raises StoreError if the URL cannot be parsed.
        """
        self._prefix = settings.key_prefix
        self._bound = settings.timeout * BOUND_FACTOR
        self._where = settings.where
        self._secrets = _secrets_in(settings)
        # Calls queue here, bounded, for one of the pool's connections: a burst waits
        # briefly instead of failing, and the round trip's own bound starts once it has one.
        self._pool_size = settings.pool_size
        self._pool_timeout = settings.pool_timeout
        self._wait_replicas = settings.wait_replicas
        self._wait_ms = max(1, int(settings.timeout * 800))
        self._slots = asyncio.Semaphore(settings.pool_size)
        try:
            self._topology = Topology(settings, pool_wait=self._bound)
        except ValueError as exc:
            raise StoreError(self._scrub(f"invalid redis url {self._where}: {exc}")) from None
        self._redis: Any = self._topology.commands
        self._cluster = self._topology.cluster
        # The keys that scripts touch together (approvals, grants, revocations, the epoch) on
        # one Cluster slot: the prefix is their hash tag, so nothing a caller names (an agent
        # id with braces) can move one of them to another slot. Counters and task histories
        # are single keys, spread over the Cluster. On one Redis the layout is unchanged.
        self._core = f"{{{self._prefix}}}" if self._cluster else self._prefix
        if self._cluster:
            _slot_tags()  # built now, not in a call's round trip
        self._reserve = self._redis.register_script(_RESERVE)
        self._release = self._redis.register_script(_RELEASE)
        self._cancel = self._redis.register_script(_CANCEL)
        self._cancelling: set[asyncio.Task[None]] = set()
        self._reapply = self._redis.register_script(_REAPPLY)
        self._prune = self._redis.register_script(_PRUNE)
        self._use_grant = self._redis.register_script(_USE_GRANT)
        self._open_approval = self._redis.register_script(_OPEN_APPROVAL)
        self._get_approval = self._redis.register_script(_GET_APPROVAL)
        self._list_approvals = self._redis.register_script(_LIST_APPROVALS)
        self._page_approvals = self._redis.register_script(_PAGE_APPROVALS)
        self._decide_approval = self._redis.register_script(_DECIDE_APPROVAL)
        self._open = self._redis.register_script(_OPEN)
        self._read = self._redis.register_script(_READ)
        self._record_task = self._redis.register_script(_RECORD_TASK)
        self._revoke = self._redis.register_script(_REVOKE)
        self._changed_channel = f"{self._core}approvals:changed"
        self._revoked_channel = f"{self._core}revocations:changed"
        self._revoked = asyncio.Event()  # a revocation was pushed since the last wait
        self._pending_key = f"{self._core}approvals:pending"
        self._waits: dict[str, set[asyncio.Event]] = {}  # approval id → its waiters' events
        self._watcher: asyncio.Task[None] | None = None
        self._watch_failing = False
        self._closing = False
        self._revocations_key = f"{self._core}revocations"
        self._epoch_key = f"{self._core}epoch"
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
            epoch, flat = await self._open(
                keys=[self._epoch_key, self._revocations_key], args=[secrets.token_hex(16)]
            )
            revocations = _parse_revocations(_pairs(flat))
        await self._open_pool()
        self._epoch = epoch
        self._mirror = {(r.kind, r.subject): r for r in revocations.values()}

    async def _open_pool(self) -> None:
        """Opens the pool's connections one by one, now, while the loop is quiet: a burst that
        opened them would find each connect slowed past its timeout by the very calls queued
        behind it. Best effort: what fails to open now opens when first needed."""
        if self._cluster:
            # One pool per node: each connection opened here is kept by its node.
            for node in self._redis.get_nodes():
                opened = []
                try:
                    for _ in range(self._pool_size):
                        connection = node.acquire_connection()
                        opened.append(connection)
                        async with asyncio.timeout(self._bound):
                            await connection.connect()
                except (RedisError, OSError):  # TimeoutError is an OSError
                    pass
                finally:
                    for connection in opened:
                        node.release(connection)
            return
        pool = self._redis.connection_pool
        opened = []
        try:
            for _ in range(self._pool_size):
                async with asyncio.timeout(self._bound):
                    opened.append(await pool.get_connection())
        except (RedisError, OSError):  # TimeoutError is an OSError
            pass
        finally:
            for connection in opened:
                await pool.release(connection)

    async def close(self) -> None:
        """Stops the subscription and the cancels still retrying (logged: their takes stay
        charged, the closed side), and closes every connection. Raises StoreError if that
        fails."""
        # redis-py may turn a cancellation that meets a read's own timeout into that
        # timeout's None (Python 3.11): the flag ends the watcher within a POLL_INTERVAL.
        self._closing = True
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.wait([self._watcher])
            self._watcher = None
        if self._cancelling:
            log.warning(
                "closing with %d refused call(s) whose reservations redis has not given back",
                len(self._cancelling),
            )
            for task in self._cancelling:
                task.cancel()
            await asyncio.wait(self._cancelling)
        async with self._bounded("close"):
            await self._topology.aclose()

    async def revoke(self, revocation: Revocation) -> None:
        """Adds or replaces the revocation of `(kind, subject)`. Raises StoreError."""
        key = (revocation.kind, revocation.subject)
        args = [_field(key), _encode(revocation), self._revoked_channel]
        async with self._bounded("revoke"):
            await self._confirmed(self._revoke, [self._revocations_key], args)
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
        args: list[list[str]] = []
        for r in wanted:
            start = r.window_at(now)
            keys.append(self._counter(r, start))
            lifetime = math.ceil((start + r.window - now + WINDOW_MARGIN) * 1000)
            args.append([repr(float(r.amount)), repr(float(r.limit)), str(lifetime)])
        # One script per slot: on a single Redis, one for all. Across Cluster slots, each
        # group is taken all-or-nothing in turn and the groups taken are given back if a
        # later one does not fit, so a counter is never overspent; a concurrent caller may
        # meet the momentary charge and be refused, the closed side.
        token = secrets.token_hex(8)
        takes: list[_Take] = []
        try:
            for group in self._by_slot(keys):
                take = _Take(
                    self._marker(token, len(takes), keys[group[0]]),
                    [keys[i] for i in group],
                    [repr(-float(wanted[i].amount)) for i in group],
                )
                takes.append(take)
                async with self._bounded("reserve"):
                    result = await self._reserve(
                        keys=[take.marker, *take.counters],
                        args=[MARKER_MS, *(a for i in group for a in args[i])],
                    )
                    if result != 0:
                        index, used = group[int(result[0]) - 1], float(result[1])
                if result == 0:
                    continue
                takes.pop()  # refused: it took nothing
                for taken in takes:
                    await self._cancel_take(taken)
                r = wanted[index]
                start = r.window_at(now)
                return LimitExceeded(r.name, used, r.limit, start + r.window - now)
        except StoreError:
            # The call is refused; whatever it took, or may yet take (a script sent to a
            # Redis that froze runs when it thaws), is given back exactly once, now or as
            # soon as Redis answers.
            left = max(r.window_at(now) + r.window - now for r in wanted)
            for take in takes:
                self._cancel_later(take, left + WINDOW_MARGIN)
            raise
        return None

    async def _cancel_take(self, take: _Take) -> None:
        """Raises StoreError."""
        async with self._bounded("reserve (giving back)"):
            await self._cancel(keys=[take.marker, *take.counters], args=[MARKER_MS, *take.back])

    def _cancel_later(self, take: _Take, within: float) -> None:
        task = asyncio.create_task(self._keep_cancelling(take, within))
        self._cancelling.add(task)
        task.add_done_callback(self._cancelling.discard)

    async def _keep_cancelling(self, take: _Take, within: float) -> None:
        """Cancels the take, retrying while Redis does not answer, for `within` seconds (its
        counters' window: after it there is nothing left to give back)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not self._closing:
            try:
                await self._cancel_take(take)
                return
            except StoreError as exc:
                if loop.time() >= deadline:
                    log.error("a refused call's reservation was not given back: %s", exc)
                    return
            await asyncio.sleep(CANCEL_RETRY)

    def _marker(self, token: str, group: int, counter: str) -> str:
        """A take's marker: in its counters' slot on a Cluster (the tag of a short string
        that hashes there), whatever braces the counter's key holds."""
        if not self._cluster:
            return f"{self._prefix}take:{token}:{group}"
        tag = _slot_tags()[key_slot(counter.encode())]
        return f"{self._prefix}take:{{{tag}}}:{token}:{group}"

    async def release(self, reservations: Iterable[Reservation], now: float) -> None:
        """Gives back reservations taken in the window that contains `now`, never going below
        zero. Raises StoreError."""
        given = list(reservations)
        if not given:
            return
        keys = [self._counter(r, r.window_at(now)) for r in given]
        await self._give_back(given, keys, range(len(given)))

    async def _give_back(
        self, reservations: list[Reservation], keys: list[str], which: Iterable[int]
    ) -> None:
        """Raises StoreError."""
        chosen = list(which)
        for group in self._by_slot([keys[i] for i in chosen]):
            picked = [chosen[i] for i in group]
            async with self._bounded("release"):
                await self._release(
                    keys=[keys[i] for i in picked],
                    args=[repr(-float(reservations[i].amount)) for i in picked],
                )

    def _by_slot(self, keys: list[str]) -> list[list[int]]:
        """The indexes of `keys`, grouped by Cluster slot (one group off a Cluster)."""
        if not self._cluster:
            return [list(range(len(keys)))] if keys else []
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key_slot(key.encode()), []).append(i)
        return list(groups.values())

    async def usage(self, reservations: Sequence[Reservation], now: float) -> list[float]:
        """Each reservation's counter now (one GET each, in parallel: on a Cluster the
        counters live on several nodes). Raises StoreError."""
        keys = [self._counter(r, r.window_at(now)) for r in reservations]
        if not keys:
            return []
        async with self._bounded("usage"):
            values = await asyncio.gather(*(self._redis.get(key) for key in keys))
        return [float(v) if v is not None else 0.0 for v in values]

    async def counters(self, prefixes: Iterable[str], now: float) -> list[Counter]:
        """The live counters of these limits, by SCAN (every node of a Cluster). Raises
        StoreError."""
        head = f"{self._prefix}limit:"
        found: list[Counter] = []
        async with self._bounded("counters"):
            for prefix in prefixes:
                pattern = head + _glob_escape(prefix) + "*"
                keys = [key async for key in self._redis.scan_iter(match=pattern, count=500)]
                values = await asyncio.gather(*(self._redis.get(key) for key in keys))
                for key, value in zip(keys, values, strict=True):
                    name = key.decode() if isinstance(key, bytes) else str(key)
                    counter, _, start = name[len(head) :].rpartition(":")
                    if value is None or not start:
                        continue
                    found.append(Counter(counter, float(start), float(value)))
        return sorted(found, key=lambda c: (c.key, c.start))

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
            raw = await self._confirmed(
                self._use_grant, [self._grant_key(fingerprint)], [repr(now)]
            )
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
        return f"{self._core}grant:{fingerprint}"

    async def open_approval(
        self,
        approval: Approval,
        now: float,
        *,
        max_pending: int,
        max_pending_per_agent: int,
        max_pending_per_user: int = 0,
        max_pending_per_rule: int = 0,
    ) -> tuple[Approval, bool] | None:
        """Finds the approval for the fingerprint or creates `approval`, in one script.

        Raises ValueError if `approval` is not a new pending approval with expires > created,
        StoreError.
        """
        _check_new(approval)
        grant_ttl = "" if approval.grant_ttl is None else repr(float(approval.grant_ttl))
        args = [
            *self._approval_args(now),
            approval.id,
            approval.fingerprint,
            approval.agent,
            repr(float(approval.created)),
            repr(float(approval.expires)),
            grant_ttl,
            orjson.dumps(approval.to_json()).decode(),
            str(max_pending),
            str(max_pending_per_agent),
            approval.user or "",
            approval.rule,
            str(max_pending_per_user),
            str(max_pending_per_rule),
        ]
        async with self._bounded("open_approval"):
            result = await self._confirmed(self._open_approval, [self._pending_key], args)
            if not result:
                return None
            return _approval_from(result[1]), bool(result[0])

    async def get_approval(self, approval_id: str, now: float) -> Approval | None:
        """The approval, expired first if overdue (one script), or None. Raises StoreError."""
        async with self._bounded("get_approval"):
            fields = await self._get_approval(
                keys=[self._pending_key], args=[*self._approval_args(now), approval_id]
            )
            return _approval_from(fields) if fields else None

    async def list_approvals(self, state: str | None, now: float) -> list[Approval]:
        """At most LIST_LIMIT approvals, oldest first, in one script. When more are pending,
        the pending list holds those that expire soonest; a list of decided ones examines at
        most LIST_SCAN records. Raises ValueError for an unknown state, StoreError."""
        wanted = "" if state is None else State(state).value
        args = [*self._approval_args(now), wanted, str(LIST_LIMIT), str(LIST_SCAN)]
        async with self._bounded("list_approvals"):
            found = await self._list_approvals(keys=[self._pending_key], args=args)
            approvals = [_approval_from(fields) for fields in found]
        return sorted(approvals, key=lambda a: (a.created, a.id))

    async def page_approvals(
        self, state: str | None, now: float, *, cursor: str | None = None, limit: int = 100
    ) -> ApprovalPage:
        """See `Store`; one script, examining at most PAGE_SCAN records. Raises ValueError,
        StoreError."""
        wanted = "" if state is None else State(state).value
        if not 1 <= limit <= PAGE_LIMIT:
            raise ValueError(f"limit must be between 1 and {PAGE_LIMIT}")
        after = ("", "") if cursor is None else decode_cursor(cursor)[1:]
        args = [*self._approval_args(now), wanted, str(limit), str(PAGE_SCAN), *after]
        async with self._bounded("page_approvals"):
            score, last, found = await self._page_approvals(keys=[self._pending_key], args=args)
            approvals = [_approval_from(fields) for fields in found]
        # decode_responses=True: the score and id are str, the score as Redis wrote it.
        return ApprovalPage(approvals, encode_cursor(score, last) if score else None)

    async def count_pending(self, now: float) -> int:
        """The pending set scores ids by `expires`: those after `now`, in one ZCOUNT."""
        async with self._bounded("count_pending"):
            count = await self._redis.zcount(self._pending_key, f"({float(now)!r}", "+inf")
        return int(count)

    async def decide_approval(
        self, approval_id: str, event: Event, by: str, reason: str, now: float
    ) -> Approval:
        """Applies `event` in one script (the lifecycle table, the grant on approve, the
        notification). Raises KeyError (unknown id), IllegalTransition, StoreError."""
        args = [*self._approval_args(now), approval_id, event.value, by, reason]
        async with self._bounded("decide_approval"):
            result = await self._confirmed(self._decide_approval, [self._pending_key], args)
            outcome = result[0]
            decided = _approval_from(result[1]) if outcome == "ok" else None
        if decided is not None:
            return decided
        if outcome == "unknown":
            raise KeyError(approval_id)
        if outcome == "voted":
            raise IllegalTransition(
                f"{by} already approved {approval_id}; it needs {result[1]} more approver(s)"
            )
        advance(State(result[1]), event)  # raises the IllegalTransition the script found
        raise StoreError(f"the approval script refused {event.value} on {result[1]}")

    # The protocol's signature: the store bounds the wait itself, as the pipeline's hold.
    async def wait_approval(self, approval_id: str, timeout: float) -> Approval | None:  # noqa: ASYNC109
        """Returns once the approval leaves `pending` on any replica, or after `timeout`
        seconds, as it then is. Woken by this store's one subscription (see the module
        docstring). With no `now` it expires nothing: an approval past `expires` that no
        operation has met yet is returned pending (`get_approval` expires it).

        Raises StoreError.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        woken = asyncio.Event()
        # Registered before the first read: a change after the read wakes this waiter, by a
        # notification or by the re-check that follows each (re)subscription.
        self._waits.setdefault(approval_id, set()).add(woken)
        try:
            self._ensure_watcher()
            while True:
                woken.clear()
                try:
                    async with self._bounded("wait_approval"):
                        # decode_responses=True: every reply is str.
                        fields = cast(
                            dict[str, str],
                            await self._redis.hgetall(self._approval_key(approval_id)),
                        )
                        approval = _approval_from(fields) if fields else None
                except StoreError:
                    # A held call outlives a dropped connection: read again shortly, and
                    # fail only when the hold is over.
                    if deadline - loop.time() <= 0:
                        raise
                    await asyncio.sleep(min(0.2, max(0.0, deadline - loop.time())))
                    continue
                left = deadline - loop.time()
                if approval is None or approval.state is not State.PENDING or left <= 0:
                    return approval
                try:
                    async with asyncio.timeout(left):
                        await woken.wait()
                except TimeoutError:
                    pass
        finally:
            waiters = self._waits.get(approval_id)
            if waiters is not None:
                waiters.discard(woken)
                if not waiters:
                    del self._waits[approval_id]

    async def wait_revocations(self, timeout: float) -> None:  # noqa: ASYNC109
        """See `Store`: woken by this store's one subscription (started here if it is not
        running), which also hears the revocations channel."""
        self._ensure_watcher()
        with suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._revoked.wait()
        self._revoked.clear()

    def _ensure_watcher(self) -> None:
        if not self._closing and (self._watcher is None or self._watcher.done()):
            self._watcher = asyncio.create_task(self._watch(), name="store-watcher")

    async def _watch(self) -> None:
        """The one subscription: wakes the waiters of every id published, and re-checks all
        waiters after each (re)subscription and every POLL_INTERVAL. Runs until `close`."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            async with self._topology.listener() as listener:
                await self._listen(listener, loop)

    async def _listen(self, listener: Redis, loop: asyncio.AbstractEventLoop) -> None:
        """One subscription, until it fails (then a pause) or the store closes."""
        pubsub = listener.pubsub()
        try:
            await pubsub.subscribe(self._changed_channel, self._revoked_channel)
            poll_at = loop.time() + POLL_INTERVAL
            while not self._closing:
                message = await pubsub.get_message(timeout=max(0.0, poll_at - loop.time()))
                if message is not None and message["channel"] == self._revoked_channel:
                    # Pushed, or (re)subscribed after pushes may have been lost: re-read.
                    self._revoked.set()
                elif message is not None and message["type"] == "message":
                    self._wake(str(message["data"]))
                elif message is not None and message["type"] == "subscribe":
                    await self._recheck()
                if loop.time() >= poll_at:
                    await self._recheck()
                    poll_at = loop.time() + POLL_INTERVAL
                    if await self._topology.moved(pubsub):
                        return  # a failover left it on a replica: resubscribe on the master
        except (RedisError, RedisClusterException, OSError, StoreError) as exc:
            # The first retry at once: a failover or a restart drops the subscription of a
            # healthy store, and its notifications should not wait for the poll. After that,
            # one attempt per POLL_INTERVAL.
            pause = POLL_INTERVAL if self._watch_failing else RESUBSCRIBE_AT_ONCE
            self._watch_failed(exc)
            await asyncio.sleep(pause)
        except Exception:
            # A bug: say so, and keep waking waiters rather than leave them to time out.
            log.exception("approval and revocation notifications stopped by a bug; resubscribing")
            await asyncio.sleep(POLL_INTERVAL)
        finally:
            # The connection is being dropped either way: closing a broken one may fail.
            with suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis 8.2

    async def _recheck(self) -> None:
        """Wakes the waiters of every approval no longer pending: one pipelined round trip
        per `RECHECK_BATCH` approvals. Raises StoreError."""
        ids = list(self._waits)
        states: list[Any] = []
        if ids:
            async with self._bounded("wait_approval (re-check)"):
                for start in range(0, len(ids), RECHECK_BATCH):
                    pipe = self._redis.pipeline(transaction=False)
                    for approval_id in ids[start : start + RECHECK_BATCH]:
                        pipe.hget(self._approval_key(approval_id), "state")
                    states += await pipe.execute()
            for approval_id, state in zip(ids, states, strict=True):
                if state != State.PENDING.value:
                    self._wake(approval_id)
        if self._watch_failing:
            self._watch_failing = False
            log.info("approval and revocation notifications from redis at %s resumed", self._where)

    def _watch_failed(self, exc: BaseException) -> None:
        # Once per outage: waiters still end at their timeout, reading Redis themselves.
        if not self._watch_failing:
            self._watch_failing = True
            log.warning(
                "approval and revocation notifications from redis at %s failed (%s); "
                "resubscribing every %gs",
                self._where,
                self._scrub(f"{type(exc).__name__}: {exc}"),
                POLL_INTERVAL,
            )

    def _wake(self, approval_id: str) -> None:
        for woken in self._waits.get(approval_id, ()):
            woken.set()

    def _approval_args(self, now: float) -> list[str]:
        return [self._core, repr(float(now))]

    def _approval_key(self, approval_id: str) -> str:
        return f"{self._core}approval:{approval_id}"

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
        self,
        task: str,
        labels: Iterable[str],
        spent: float,
        ttl: float,
        now: float,
        calls: int = 1,
    ) -> None:
        """Counts `calls` calls of `task`, adds their labels and spend, and restarts its `ttl`,
        all in one transaction. Raises StoreError."""
        key = self._task_key(task)
        added = [f"label:{label}" for label in labels]
        # A TTL of zero or less deletes the key, as MemoryStore forgets it at once.
        args = [str(calls), repr(float(spent)), str(math.ceil(ttl * 1000)), *added]
        async with self._bounded("record_task"):
            await self._record_task(keys=[key], args=args)

    async def _read_revocations(self) -> tuple[str | None, dict[str, str]]:
        epoch, flat = await self._read(keys=[self._epoch_key, self._revocations_key], args=[])
        return epoch or None, _pairs(flat)

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

    async def _confirmed(self, script: AsyncScript, keys: list[str], args: list[str]) -> Any:
        """Runs the script; with `wait_replicas`, on the same connection as `WAIT` (which
        counts the replicas holding this connection's writes), and refuses when fewer
        confirm within 80% of `timeout`: then what it wrote may be lost in a failover,
        and the call it served must not go ahead. Raises StoreError (and what `_bounded`
        turns into one)."""
        if not self._wait_replicas:
            return await script(keys=keys, args=args)
        pipe = self._redis.pipeline(transaction=False)
        await script(keys=keys, args=args, client=pipe)
        # Below the socket timeout, so WAIT's own answer (too few) arrives before it.
        pipe.execute_command("WAIT", self._wait_replicas, self._wait_ms)
        result, confirmed = await pipe.execute()
        if int(confirmed) < self._wait_replicas:
            raise StoreError(
                f"redis write confirmed by {confirmed} of {self._wait_replicas} replica(s) "
                f"within {self._wait_ms} ms ({self._where}): refused, as a failover could "
                "lose it"
            )
        return result

    @asynccontextmanager
    async def _bounded(self, operation: str) -> AsyncIterator[None]:
        """Bounds the block in time. Raises StoreError on a timeout, a Redis or socket error,
        or a reply that cannot be parsed."""
        try:
            async with asyncio.timeout(self._pool_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise StoreError(
                f"redis {operation}: no connection free within {self._pool_timeout:g}s "
                f"(pool_size {self._pool_size}, {self._where})"
            ) from None
        try:
            async with asyncio.timeout(self._bound):
                yield
        except TimeoutError:
            # Before OSError, of which TimeoutError is a subclass.
            raise StoreError(
                self._scrub(f"redis {operation} timed out after {self._bound:g}s ({self._where})")
            ) from None
        except (RedisError, RedisClusterException, OSError, ValueError) as exc:
            raise StoreError(
                self._scrub(
                    f"redis {operation} failed ({self._where}): {type(exc).__name__}: {exc}"
                )
            ) from exc
        finally:
            self._slots.release()

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


@functools.cache
def _slot_tags() -> list[str]:
    """For each of the 16,384 Cluster slots, the shortest decimal number that hashes there
    (found by counting: ~0.1 s, once per process)."""
    tags: list[str | None] = [None] * 16384
    left = len(tags)
    for n in itertools.count():
        text = str(n)
        slot = key_slot(text.encode())
        if tags[slot] is None:
            tags[slot] = text
            left -= 1
            if not left:
                return [t for t in tags if t is not None]
    raise AssertionError("unreachable")


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


def _check_new(approval: Approval) -> None:
    if approval.state is not State.PENDING or approval.decided_at is not None:
        raise ValueError(f"approval {approval.id} is not a new pending approval")
    if not (math.isfinite(approval.created) and approval.created < approval.expires < math.inf):
        raise ValueError(f"approval {approval.id} must expire after it is created")


def _approval_from(flat: list[str] | dict[str, str]) -> Approval:
    """The approval of a record's fields (a script's flat list or HGETALL's dict). Raises
    ValueError (a StoreError once bounded) for a record that is not an approval."""
    fields = flat if isinstance(flat, dict) else dict(zip(flat[::2], flat[1::2], strict=True))
    try:
        created = Approval.from_json(orjson.loads(fields["json"]))
        decided_at = fields.get("decided_at")
        votes = fields.get("votes")
        return replace(
            created,
            state=State(fields["state"]),
            decided_by=fields.get("decided_by"),
            decided_reason=fields.get("decided_reason"),
            decided_at=None if decided_at is None else float(decided_at),
            votes=tuple(Vote.from_json(v) for v in orjson.loads(votes)) if votes else (),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed approval record: {type(exc).__name__}: {exc}") from None


def _secrets_in(settings: RedisSettings) -> list[str]:
    parts = urlsplit(settings.url)
    found = [parts.password or ""]
    found += parse_qs(parts.query).get("password", [])
    sentinel = None if settings.sentinel is None else settings.sentinel.password
    for secret in (settings.password, sentinel):
        if secret is not None:
            found.append(secret.value.decode(errors="replace"))
    found += [unquote(s) for s in found]
    # Longest first, so a secret containing another is replaced whole.
    return sorted({s for s in found if s}, key=len, reverse=True)


def _pairs(flat: list[str]) -> dict[str, str]:
    """HGETALL's reply inside a script (a flat field, value list) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _glob_escape(text: str) -> str:
    """`text` matched literally by a Redis glob (MATCH)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
