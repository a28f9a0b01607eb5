"""The queue on Redis (redis-py), for API front-ends and GPU workers in separate processes and machines.

Layout (all keys under `flux2:`):
- `req:{id}`: a hash, the request record (the `QueuedRequest` fields, plus `stream`, `entry`, `worker`,
  `attempts`). Kept without expiry until completed, then for the retention period.
- `q:{priority}:{endpoint_id}`: one Redis Stream per priority and endpoint; an entry carries a request id. The
  consumer group `workers` hands each entry to one worker (XREADGROUP); a worker reads only the streams of the
  endpoints its model runs, higher priority first, then the oldest entry. The entry stays pending until the
  request completes; the claiming worker renews it at every denoising step (`progress`) and, between steps, every
  `visibility_timeout_s / 3` (for at most `step_timeout_s` after the last step), so an entry idle longer than
  `visibility_timeout_s` belongs to a worker that died or hangs, and the next worker to look claims it
  (XAUTOCLAIM): at-least-once delivery.
- `lease-ms`: the visibility timeout (the lease) every worker uses: stored by the first worker to claim, adopted
  by the others (a worker with a shorter setting would otherwise take over requests that are alive).
- `logs:{id}`: a list of log lines (JSON), appended by the worker, read by whichever front-end answers status.
- `cancel:{id}`: set by a front-end, polled by the running worker after every denoising step.
- `worker:{id}`: a worker's advertisement (JSON), expiring unless its heartbeat renews it; `workers`: the set of
  their ids, so /health reads them without scanning the keyspace.
- `q:...:requeued`: per stream, the requests given back to the queue (released) whose entries are still pending:
  they are served first, and queue positions count them.
- `epoch`: set once when this Redis is first used; a process that finds it changed (or the consumer groups gone)
  knows Redis came back empty, creates what is missing and records `reset` (when, and what was lost) for /health.

Outages: every queue call that can't reach Redis raises `QueueUnavailable` (a 503 with Retry-After on the routes;
the dispatcher waits it out, holding a finished result until it is recorded) instead of the client's error, which
names the server's address. Nothing here needs Redis to be up at start: the groups are created on first contact.

Claiming and completing are Lua scripts (atomic in Redis): a request is claimed by one worker at a time and
completed exactly once, even if two workers ran it (a worker that stalled past the visibility timeout). Each claim
increments the request's `lease` (a fencing token the claimer keeps): completion, progress and renewal check it, so
a worker whose request was taken over can't record an outcome (its dispatcher deletes the files it wrote) and
stops at its next step.

Durability is Redis's: run it with `appendonly yes` (and `appendfsync always` for an accepted submit to survive a
power cut, as the SQLite queue's does).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Collection
from dataclasses import fields
from datetime import UTC, datetime
from typing import cast

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from server.endpoints import ENDPOINTS
from server.errors import QueueUnavailable
from server.logs import redacted
from server.queue.backend import PRIORITIES, QueuedRequest

log = logging.getLogger(__name__)

PREFIX = "flux2:"
GROUP = "workers"
COMPLETED_CHANNEL = f"{PREFIX}completed"  # pub/sub: the id of each request as it completes
INT_FIELDS = {"seq", "priority", "status_code", "attempts", "progress_step", "progress_total"}
FLOAT_FIELDS = {"start_deadline", "created_at", "started_at", "completed_at"}
RECORD_FIELDS = [f.name for f in fields(QueuedRequest) if f.name != "input"]  # what `get` reads
EPOCH, RESET, WORKERS = f"{PREFIX}epoch", f"{PREFIX}reset", f"{PREFIX}workers"
REQUEUED = ":requeued"  # suffix of a stream's key: its released requests (sorted set, score: seq)
# Redis unreachable (down, restarting, a network cut, a read-only replica after failover): a QueueUnavailable
OUTAGES = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError)
RETRY_AFTER_S = 5  # the Retry-After of a 503 while Redis is unreachable
LOST = (
    "every request accepted before this time (queued, running or finished: status, result, logs), uploads in "
    "progress and webhook deliveries not yet made"
)

ADD = """
local seq = redis.call('INCR', KEYS[3])
local entry = redis.call('XADD', KEYS[2], seq .. '-0', 'id', ARGV[1])  -- ids in arrival order across streams
redis.call('HSET', KEYS[1], 'seq', seq, 'stream', KEYS[2], 'entry', entry, 'status', 'IN_QUEUE', 'attempts', 0,
           unpack(ARGV, 2))
return seq
"""

# KEYS: the streams this worker reads, in serve order; ARGV: consumer, now, visibility (ms), prefix, reserve (1: the
# request stays IN_QUEUE, held by this worker: `reserve`), then the priority of each stream. Returns {request id,
# previous worker or '', lease} or {false, last entry id of each stream}. A request's `lease` counts its claims:
# the claim's fencing token.
CLAIM = """
local group, consumer, now, idle_ms, prefix, reserve = 'workers', ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

local function take(stream, entry, rid)
  local key = prefix .. 'req:' .. rid
  local status = redis.call('HGET', key, 'status')
  if status ~= 'IN_QUEUE' and status ~= 'IN_PROGRESS' then  -- finished (or purged) meanwhile
    redis.call('XACK', stream, group, entry)
    redis.call('XDEL', stream, entry)
    return nil
  end
  local mark = redis.call('HMGET', key, 'failed_by', 'elsewhere_until')
  if mark[1] == consumer and tonumber(mark[2] or 0) > tonumber(now) then
    -- this worker failed on it for a reason of its own: left to other workers for a while (idle again)
    redis.call('XCLAIM', stream, group, consumer, 0, entry, 'IDLE', idle_ms + 1, 'JUSTID')
    return nil
  end
  local previous = redis.call('HGET', key, 'worker') or ''
  local lease = redis.call('HINCRBY', key, 'lease', 1)  -- the fencing token: only its holder records an outcome
  if reserve == '1' then
    -- held while its inputs are fetched ahead: still queued, counted with the released ones (positions, depth)
    redis.call('HSET', key, 'status', 'IN_QUEUE', 'worker', consumer, 'reserved', consumer)
    redis.call('HDEL', key, 'started_at')
    redis.call('ZADD', stream .. ':requeued', redis.call('HGET', key, 'seq'), key)
  else
    redis.call('ZREM', stream .. ':requeued', key)
    redis.call('HSET', key, 'status', 'IN_PROGRESS', 'started_at', now, 'worker', consumer)
    redis.call('HDEL', key, 'reserved')
    redis.call('HINCRBY', key, 'attempts', 1)
  end
  return {rid, previous, lease}
end

-- 1. entries abandoned by a worker that stopped touching them (crashed, or released at shutdown), the whole
-- pending list followed by its cursor (each call looks at 10 entries per COUNT: live ones are passed over)
for _, stream in ipairs(KEYS) do
  local cursor = '0-0'
  repeat
    local found = redis.call('XAUTOCLAIM', stream, group, consumer, idle_ms, cursor, 'COUNT', 1)
    cursor = found[1]
    for _, e in ipairs(found[2]) do
      local taken = take(stream, e[1], e[2][2])
      if taken then return taken end
    end
  until cursor == '0-0'
end

-- 2. new entries: the highest priority with any, then the oldest of those
local function next_new(stream)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then
      local e = redis.call('XRANGE', stream, '(' .. info['last-delivered-id'], '+', 'COUNT', 1)[1]
      return e and e[1]
    end
  end
end
local function older(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  return tonumber(as) < tonumber(bs)
end
for _ = 1, 100 do
  local best, best_priority, best_entry
  for i, stream in ipairs(KEYS) do
    local priority = tonumber(ARGV[5 + i])
    if best_priority and priority > best_priority then break end
    local entry = next_new(stream)
    if entry and (not best or older(entry, best_entry)) then
      best, best_priority, best_entry = stream, priority, entry
    end
  end
  if not best then break end
  local e = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', best, '>')[1][2][1]
  local taken = take(best, e[1], e[2][2])
  if taken then return taken end
end

local last = {}
for i, stream in ipairs(KEYS) do
  local e = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  last[i] = e and e[1] or '0-0'
end
return {false, last}
"""

# KEYS: request hash, its logs, its cancel flag, the pending webhooks, its webhook's lease; ARGV: only_if_queued,
# retention (s), the caller's lease ('' if it holds none), its webhook delivery (JSON, or ''), the delivery's lease
# (ms), this consumer, then field/value pairs. Returns 1 if recorded (with its webhook delivery kept, in the same
# step), 0 if it already has an outcome (or, only_if_queued, has started), -1 if it runs under a lease the caller
# does not hold (fenced: another worker took it over).
COMPLETE = """
local r = redis.call('HMGET', KEYS[1], 'status', 'lease', 'reserved')
local status = r[1]
if not status or status == 'COMPLETED' then return 0 end
if ARGV[1] == '1' and status ~= 'IN_QUEUE' then return 0 end
local held = status == 'IN_PROGRESS' or (status == 'IN_QUEUE' and r[3] == ARGV[6])  -- running, or reserved here
if (ARGV[3] ~= '' or status == 'IN_PROGRESS') and (not held or r[2] ~= ARGV[3]) then return -1 end
redis.call('HDEL', KEYS[1], 'error', 'error_type')
redis.call('HSET', KEYS[1], 'status', 'COMPLETED', unpack(ARGV, 7))
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[4], redis.call('HGET', KEYS[1], 'id'), ARGV[4])
  redis.call('SET', KEYS[5], ARGV[6], 'PX', ARGV[5])
end
local place = redis.call('HMGET', KEYS[1], 'stream', 'entry')
redis.call('XACK', place[1], 'workers', place[2])
redis.call('XDEL', place[1], place[2])
redis.call('ZREM', place[1] .. ':requeued', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[3])
return 1
"""

# KEYS: request hash; ARGV: consumer, idle (ms) to set, release (1/0), uncount the attempt (1/0), lease, time
# until which other workers take it first ('' for none). Touches a claimed or reserved entry (idle 0), or gives it
# up (idle past the visibility timeout, so the next worker claims it at once), if this consumer still holds its
# lease.
TOUCH = """
local r = redis.call('HMGET', KEYS[1], 'status', 'worker', 'stream', 'entry', 'seq', 'lease', 'reserved')
local held = r[1] == 'IN_PROGRESS' or (r[1] == 'IN_QUEUE' and r[7] == ARGV[1])
if not held or r[2] ~= ARGV[1] or r[6] ~= ARGV[5] then return 0 end
redis.call('XCLAIM', r[3], 'workers', ARGV[1], 0, r[4], 'IDLE', ARGV[2], 'JUSTID')
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'status', 'IN_QUEUE')
  redis.call('HDEL', KEYS[1], 'reserved')
  redis.call('ZADD', r[3] .. ':requeued', r[5], KEYS[1])  -- served before new entries: positions count it
end
if ARGV[4] == '1' and r[1] == 'IN_PROGRESS' then  -- a graceful stop: not an attempt (a reserved one was none yet)
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'failed_by', ARGV[1], 'elsewhere_until', ARGV[6]) end
return 1
"""

# KEYS: request hash; ARGV: consumer, lease, step, total. Progress renews the claim (idle 0), if this consumer
# still holds its lease; 0 if it does not.
PROGRESS = """
local r = redis.call('HMGET', KEYS[1], 'status', 'worker', 'stream', 'entry', 'lease')
if r[1] ~= 'IN_PROGRESS' or r[2] ~= ARGV[1] or r[5] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', r[3], 'workers', ARGV[1], 0, r[4], 'IDLE', 0, 'JUSTID')
redis.call('HSET', KEYS[1], 'progress_step', ARGV[3], 'progress_total', ARGV[4])
return 1
"""

# KEYS: request hash; ARGV: consumer, now, lease. A request this consumer reserved (and still holds) is IN_PROGRESS
# now, its attempt counted (1), or 0.
START = """
local r = redis.call('HMGET', KEYS[1], 'status', 'reserved', 'stream', 'entry', 'lease')
if r[1] ~= 'IN_QUEUE' or r[2] ~= ARGV[1] or r[5] ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'IN_PROGRESS', 'started_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'reserved')
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('ZREM', r[3] .. ':requeued', KEYS[1])
redis.call('XCLAIM', r[3], 'workers', ARGV[1], 0, r[4], 'IDLE', 0, 'JUSTID')
return 1
"""

# KEYS: request hash; ARGV: stream, priority, ... in serve order. How many queued requests are served before this
# one: released ones first (all of them before a new entry; those of earlier streams, and older ones in its own,
# before a released one), then undelivered entries by priority and arrival.
POSITION = """
local r = redis.call('HMGET', KEYS[1], 'status', 'stream', 'entry', 'priority', 'seq')
if r[1] ~= 'IN_QUEUE' then return 0 end
local count = 0
local released = redis.call('ZSCORE', r[2] .. ':requeued', KEYS[1])
for i = 2, #ARGV, 2 do
  local stream = ARGV[i - 1]
  if released and stream == r[2] then
    return count + redis.call('ZCOUNT', stream .. ':requeued', '-inf', '(' .. r[5])
  end
  count = count + redis.call('ZCARD', stream .. ':requeued')
end
for i = 2, #ARGV, 2 do
  local stream, priority = ARGV[i - 1], tonumber(ARGV[i])
  if priority <= tonumber(r[4]) and redis.call('EXISTS', stream) == 1 then
    local last = '0-0'
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
      for j = 1, #g, 2 do if g[j] == 'last-delivered-id' then last = g[j + 1] end end
    end
    local stop = priority < tonumber(r[4]) and '+' or '(' .. r[3]
    count = count + #redis.call('XRANGE', stream, '(' .. last, stop)
  end
end
return count
"""


# KEYS: request hash, its logs; ARGV: the line, retention (s). A line added after completion (a cancel's) expires
# with the record; one whose record is gone (purged, or Redis emptied) after the retention period.
LOG = """
redis.call('RPUSH', KEYS[2], ARGV[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) elseif ttl == -2 then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
"""


def _encode(value) -> str:
    return str(value)


def _decode(record: dict) -> QueuedRequest:
    values: dict = dict(record)
    for name in INT_FIELDS & values.keys():
        values[name] = int(values[name])
    for name in FLOAT_FIELDS & values.keys():
        values[name] = float(values[name])
    return QueuedRequest.from_mapping(values)


def _answers_outages(method):
    """A queue call that raises `QueueUnavailable` while Redis can't be reached (and notes the outage once); after
    the consumer groups vanished (NOGROUP: Redis came back empty), creates them again and retries once."""

    @functools.wraps(method)
    def call(self: RedisQueue, *args, **kwargs):
        try:
            try:
                result = method(self, *args, **kwargs)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._prepare()
                result = method(self, *args, **kwargs)
        except OUTAGES as exc:
            if self.down_since is None:
                self.down_since = time.time()
                log.error("the queue (Redis at %s) is unreachable: %s; retrying", self.location, exc)
            raise QueueUnavailable(RETRY_AFTER_S) from exc
        if self.down_since is not None:
            log.warning("the queue (Redis at %s) is reachable again", self.location)
            self.down_since = None
            try:
                self._prepare()  # it may have come back empty (restarted without persistence)
            except OUTAGES:
                self.down_since = time.time()  # gone again: the next call that reaches it prepares it
        return result

    return call


# the queue calls (QueueBackend's, and `health`): each raises QueueUnavailable while Redis is unreachable
ANSWERED = [
    *("add", "get", "position", "queued_count", "claim", "release", "complete", "log", "progress", "logs"),
    *("request_cancel", "cancel_requested", "heartbeat", "workers", "health", "queued_ids"),
    *("add_upload", "get_upload", "add_upload_part", "upload_parts", "upload_part_sizes", "pending_upload_bytes"),
    *("remove_upload", "save_webhook", "webhook_done", "take_webhooks"),
]


class RedisQueue:
    distributed = True  # requests are run by `flux2-server worker` processes

    def __init__(
        self,
        url: str,
        retention_s: float,
        visibility_timeout_s: float = 30.0,
        consumer: str | None = None,
        timeout_s: float = 5.0,
        ca_file: str | None = None,
        step_timeout_s: float | None = None,
        retry_elsewhere_s: float = 60.0,
    ):
        """`timeout_s`: a connect or a reply taking longer means Redis is unreachable; `ca_file`: the CA that signed
        a `rediss://` server's certificate (default: the system's)."""
        tls = {"ssl_ca_certs": ca_file} if ca_file else {}
        self.redis = redis.Redis.from_url(
            url,
            decode_responses=True,
            health_check_interval=30,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.1), 1),  # longer outages: QueueUnavailable, see above
            **tls,
        )
        self.location = redacted(url)
        self.down_since: float | None = None  # when the current outage began (None: reachable)
        self._epoch: str | None = None  # this Redis's epoch, as last seen
        self.retention_s = max(1, int(retention_s))
        self.visibility_ms = int(visibility_timeout_s * 1000)  # until the first claim adopts the shared one
        self._lease_adopted = False
        self.step_timeout_s = step_timeout_s  # renewal between steps stops this long after the last step
        self.retry_elsewhere_s = retry_elsewhere_s  # a request this worker failed on is left to others this long
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.streams = [  # every stream, in serve order
            (f"{PREFIX}q:{priority}:{e.endpoint_id}", priority, e.endpoint_id)
            for priority in sorted(PRIORITIES.values())
            for e in ENDPOINTS
        ]
        self._add = self.redis.register_script(ADD)
        self._claim = self.redis.register_script(CLAIM)
        self._complete = self.redis.register_script(COMPLETE)
        self._touch = self.redis.register_script(TOUCH)
        self._progress = self.redis.register_script(PROGRESS)
        self._position = self.redis.register_script(POSITION)
        self._log = self.redis.register_script(LOG)
        self._start = self.redis.register_script(START)
        self._last_ids: dict[str, str] = {}
        self._claimed: dict[str, str] = {}  # requests this process runs -> its lease on each; their entries are renewed
        self._stepped: dict[str, float] = {}  # ... and when each was claimed or last made progress (monotonic)
        self._lost: set[str] = set()  # requests this process claimed and another worker took over
        self._closing = threading.Event()
        self._toucher: threading.Thread | None = None
        # sync callers on this front-end waiting for a request a worker runs: woken by its completion message
        self._completion_waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._listener: threading.Thread | None = None
        self._listening = threading.Event()
        try:
            self._prepare()
        except OUTAGES as exc:  # not up yet: the first call that reaches it prepares it
            self.down_since = time.time()
            log.error("the queue (Redis at %s) is unreachable: %s; retrying", self.location, exc)

    def _prepare(self) -> None:
        """Create the consumer groups that are missing, and check this Redis's epoch: one that changed since this
        process last looked means Redis came back empty (restarted without persistence, FLUSHALL, a failover to an
        empty replica). Then `reset` records when, and what was lost, for /health on every front-end."""
        with self.redis.pipeline(transaction=False) as pipe:
            for stream, _, _ in self.streams:
                pipe.xgroup_create(stream, GROUP, id="0", mkstream=True)  # id 0: entries added meanwhile are served
            for reply in pipe.execute(raise_on_error=False):
                if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                    raise reply
        self.redis.set(EPOCH, f"{time.time():.6f}-{self.consumer}", nx=True)
        epoch = cast(str, self.redis.get(EPOCH))
        if self._epoch is not None and epoch != self._epoch:
            now = time.time()
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.hsetnx(RESET, "reset_at", now)  # the first process to notice says when
                pipe.hsetnx(RESET, "lost", LOST)
                pipe.execute()
            log.error("the queue's Redis came back empty: lost %s; the queue is serving again", LOST)
        self._epoch = epoch

    def health(self) -> dict:
        """/health's `queue`: reachable, and whether (when) Redis came back empty and what was lost then. A fixed
        number of Redis calls, whatever the number of keys."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(EPOCH)
            pipe.hgetall(RESET)
            epoch, reset = pipe.execute()
        if epoch != self._epoch:
            self._prepare()
            reset = self.redis.hgetall(RESET)
        answer: dict = {"reachable": True}
        if reset:
            answer.update(reset_at=float(reset["reset_at"]), lost=reset.get("lost"))
        return answer

    @staticmethod
    def _key(request_id: str) -> str:
        return f"{PREFIX}req:{request_id}"

    def add(
        self,
        request_id: str,
        endpoint_id: str,
        input_json: str,
        priority: int,
        queue_url: str,
        files_url: str,
        webhook_url: str | None,
        start_timeout_s: float | None,
        owner: str | None = None,
    ) -> None:
        now = time.time()
        fields = {
            "id": request_id,
            "endpoint_id": endpoint_id,
            "input": input_json,
            "priority": priority,
            "queue_url": queue_url,
            "files_url": files_url,
            "webhook_url": webhook_url,
            "start_deadline": now + start_timeout_s if start_timeout_s else None,
            "created_at": now,
            "owner": owner,
        }
        pairs = [x for k, v in fields.items() if v is not None for x in (k, _encode(v))]
        stream = f"{PREFIX}q:{priority}:{endpoint_id}"
        self._add(keys=[self._key(request_id), stream, f"{PREFIX}seq"], args=[request_id, *pairs])

    def get(self, request_id: str) -> QueuedRequest | None:
        """The record's fields but `input` (status polls never move the input, up to the body limit, out of Redis)."""
        values = self.redis.hmget(self._key(request_id), RECORD_FIELDS)
        record = {name: value for name, value in zip(RECORD_FIELDS, values, strict=True) if value is not None}
        return _decode(record) if record.get("id") else None

    def position(self, request: QueuedRequest) -> int:
        args = [x for stream, priority, _ in self.streams for x in (stream, priority)]
        return int(self._position(keys=[self._key(request.id)], args=args))

    def queued_count(self) -> int:
        """Entries not delivered (a stream's length less its pending entries), and released ones."""
        with self.redis.pipeline(transaction=True) as pipe:
            for stream, _, _ in self.streams:
                pipe.xlen(stream)
                pipe.xpending(stream, GROUP)
                pipe.zcard(stream + REQUEUED)
            replies = pipe.execute()
        return sum(replies[0::3]) - sum(p["pending"] for p in replies[1::3]) + sum(replies[2::3])

    def queued_ids(self, endpoint_ids: Collection[str]) -> list[str]:
        """Undelivered entries of these endpoints' streams, and their released requests."""
        ids = []
        for stream, _, endpoint_id in self.streams:
            if endpoint_id not in endpoint_ids:
                continue
            groups = cast(list[dict], self.redis.xinfo_groups(stream))
            last = next((g["last-delivered-id"] for g in groups if g["name"] == GROUP), "0-0")
            entries = cast(list[tuple[str, dict[str, str]]], self.redis.xrange(stream, f"({last}", "+", count=1000))
            ids += [entry["id"] for _, entry in entries]
            released = cast(list[str], self.redis.zrange(stream + REQUEUED, 0, 999))
            ids += [key.removeprefix(f"{PREFIX}req:") for key in released]
        return ids

    def _adopt_shared_lease(self) -> None:
        """Use the lease all workers share (`flux2:lease-ms`), storing this worker's own if none is stored yet."""
        key = f"{PREFIX}lease-ms"
        self.redis.set(key, self.visibility_ms, nx=True)
        shared = int(cast(str, self.redis.get(key) or self.visibility_ms))
        if shared != self.visibility_ms:
            log.warning(
                "the queue's workers share a lease of %g s (%s): this worker uses it, not its own setting of %g s "
                "(FLUX2_QUEUE_VISIBILITY_TIMEOUT_S). To change it, stop every worker and delete %s.",
                shared / 1000,
                key,
                self.visibility_ms / 1000,
                key,
            )
            self.visibility_ms = shared
        self._lease_adopted = True

    def start(self, request_id: str) -> bool:
        lease = self._claimed.get(request_id, "")
        started = bool(self._start(keys=[self._key(request_id)], args=[self.consumer, time.time(), lease]))
        if started:
            self._stepped[request_id] = time.monotonic()  # the step watchdog's clock starts with the run
            self.log(request_id, f"Running on worker {self.consumer}")
        else:  # finished meanwhile (a queued cancel), or taken over: not renewed any more
            self._claimed.pop(request_id, None)
            self._stepped.pop(request_id, None)
        return started

    def claim(self, endpoint_ids: Collection[str], reserve: bool = False) -> QueuedRequest | None:
        if not self._lease_adopted:
            self._adopt_shared_lease()
        streams = [(s, p) for s, p, e in self.streams if e in endpoint_ids]
        args: list = [self.consumer, time.time(), self.visibility_ms, PREFIX, int(reserve), *(p for _, p in streams)]
        found = self._claim(keys=[s for s, _ in streams], args=args)
        if not found[0]:
            self._last_ids = dict(zip((s for s, _ in streams), found[1], strict=True))
            return None
        request_id, previous, lease = found
        if not reserve:
            self.log(request_id, f"Running on worker {self.consumer}")
        if previous:
            message = f"Worker {previous} stopped before finishing this request: it runs again on {self.consumer}"
            log.warning("request %s: %s", request_id, message)
            self.log(request_id, message, "WARNING")
        self._claimed[request_id] = str(lease)
        if not reserve:  # a reserved request's step clock starts when it starts (`start`)
            self._stepped[request_id] = time.monotonic()
        self._lost.discard(request_id)
        self._start_toucher()
        claimed = self.get(request_id)
        if claimed is not None:
            claimed.input = cast(str | None, self.redis.hget(self._key(request_id), "input"))  # decode_responses
        return claimed

    def _start_toucher(self) -> None:
        if self._toucher is None:
            self._toucher = threading.Thread(target=self._touch_claimed, name="flux2-queue-touch", daemon=True)
            self._toucher.start()

    def _touch_claimed(self) -> None:
        """Keep this process's claimed entries fresh between steps (before the first, after the last), so no other
        worker takes them over while they run; not one whose last step is more than `step_timeout_s` ago (it
        hangs: another worker takes it over, and this one can't record it)."""
        while not self._closing.wait(self.visibility_ms / 3000):
            for request_id, lease in list(self._claimed.items()):
                stepped = self._stepped.get(request_id)  # None: reserved, waiting for the model (no step yet)
                if self.step_timeout_s and stepped is not None and time.monotonic() - stepped > self.step_timeout_s:
                    continue
                try:
                    if not self._touch(keys=[self._key(request_id)], args=[self.consumer, 0, 0, 0, lease, ""]):
                        self._lose(request_id)
                except redis.RedisError as exc:
                    log.warning("could not renew the claim on request %s: %s", request_id, exc)

    def _lose(self, request_id: str) -> None:
        """Another worker took over `request_id` (this one's lease ran out): stop renewing it, stop it."""
        if self._claimed.pop(request_id, None) is not None:
            self._stepped.pop(request_id, None)
            self._lost.add(request_id)
            log.warning("request %s: this worker lost its lease on it (another worker runs it now)", request_id)

    def lease_lost(self, request_id: str) -> bool:
        """True once another worker took over a request this process claimed (its lease ran out while it stalled):
        this process must not record an outcome for it."""
        return request_id in self._lost

    async def wait_for_work(self, wakeup: asyncio.Event, timeout_s: float) -> None:
        if not self._last_ids:
            await asyncio.sleep(0)
            return
        streams: dict = dict(self._last_ids)
        reading = asyncio.ensure_future(
            asyncio.to_thread(self.redis.xread, streams, count=1, block=int(timeout_s * 1000))
        )
        woken = asyncio.ensure_future(wakeup.wait())
        await asyncio.wait({reading, woken}, return_when=asyncio.FIRST_COMPLETED)
        woken.cancel()
        reading.add_done_callback(lambda done: done.cancelled() or done.exception())  # an outage: `claim` says so

    async def wait_completed(self, request_id: str, timeout_s: float) -> None:
        """Wait for the completion message of `request_id` (published by `complete`, heard by one listener thread
        per process), or `timeout_s`; a message missed meanwhile costs at most `timeout_s`."""
        self._listen()
        woken = asyncio.Event()
        waiters = self._completion_waiters.setdefault(request_id, [])
        waiters.append((asyncio.get_running_loop(), woken))
        try:
            await asyncio.wait_for(woken.wait(), timeout_s)
        except TimeoutError:
            pass
        finally:
            waiters.remove((asyncio.get_running_loop(), woken))
            if not waiters:
                self._completion_waiters.pop(request_id, None)

    def _listen(self) -> None:
        """Start the listener thread once; return when it is subscribed."""
        if self._listener is None:
            self._listener = threading.Thread(target=self._hear_completions, name="flux2-completions", daemon=True)
            self._listener.start()
        self._listening.wait(10)

    def _hear_completions(self) -> None:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(COMPLETED_CHANNEL)
        self._listening.set()
        try:
            while not self._closing.is_set():
                try:
                    message = pubsub.get_message(timeout=1.0)
                except (redis.RedisError, OSError):  # Redis restarting: waiters fall back to their timeouts meanwhile
                    self._closing.wait(1.0)
                    continue
                if message is None:
                    continue
                for loop, woken in list(self._completion_waiters.get(message["data"], ())):
                    loop.call_soon_threadsafe(woken.set)
        finally:
            pubsub.close()

    def release(self, request_id: str, attempt_failed: bool = False) -> None:
        """Hand an interrupted request straight to the next worker: its entry looks abandoned at once. A graceful
        stop's claim is not counted as an attempt. After a failure of this worker's (`attempt_failed`), other
        workers take it first for `retry_elsewhere_s` (this one takes it again after that, if no other did)."""
        lease = self._claimed.pop(request_id, None)
        self._stepped.pop(request_id, None)
        if lease is None:  # not this process's (any more)
            return
        uncount = 0 if attempt_failed else 1
        elsewhere = str(time.time() + self.retry_elsewhere_s) if attempt_failed else ""
        args: list[str | int] = [self.consumer, self.visibility_ms + 1, 1, uncount, lease, elsewhere]
        self._touch(keys=[self._key(request_id)], args=args)

    def complete(
        self,
        request_id: str,
        status_code: int,
        result: dict,
        error: str | None = None,
        error_type: str | None = None,
        metrics: dict | None = None,
        only_if_queued: bool = False,
        webhook: dict | None = None,
        webhook_lease_s: float = 0.0,
    ) -> bool:
        fields = {
            "completed_at": time.time(),
            "status_code": status_code,
            "result": json.dumps(result),
            "error": error,
            "error_type": error_type,
            "metrics": json.dumps(metrics or {}),
        }
        pairs = [x for k, v in fields.items() if v is not None for x in (k, _encode(v))]
        keys = [self._key(request_id), f"{PREFIX}logs:{request_id}", f"{PREFIX}cancel:{request_id}"]
        keys += [f"{PREFIX}webhooks", f"{PREFIX}webhook-lease:{request_id}"]
        lease = "" if only_if_queued else self._claimed.get(request_id, "")
        delivery = json.dumps(webhook) if webhook is not None else ""
        args = ["1" if only_if_queued else "0", self.retention_s, lease, delivery, max(1, int(webhook_lease_s * 1000))]
        recorded = self._complete(keys=keys, args=[*args, self.consumer, *pairs])
        if recorded == 1:
            self.redis.publish(COMPLETED_CHANNEL, request_id)  # wakes the front-end a sync caller waits on
        if recorded == -1:  # fenced: another worker holds its lease now
            self._lose(request_id)
        if recorded == 1 or not only_if_queued:
            self._claimed.pop(request_id, None)
            self._stepped.pop(request_id, None)
        return recorded == 1

    def log(self, request_id: str, message: str, level: str = "INFO") -> None:
        line = json.dumps({"at": time.time(), "level": level, "message": message})
        self._log(keys=[self._key(request_id), f"{PREFIX}logs:{request_id}"], args=[line, self.retention_s])

    def progress(self, request_id: str, step: int, total: int) -> None:
        """Also renews the claim: a step done is the surest sign of life. Refused once another worker took the
        request over (`lease_lost`; the run then stops at this step)."""
        lease = self._claimed.get(request_id)
        if lease is None:
            return
        self._stepped[request_id] = time.monotonic()
        if not self._progress(keys=[self._key(request_id)], args=[self.consumer, lease, step, total]):
            self._lose(request_id)

    def logs(self, request_id: str) -> list[dict]:
        lines = [json.loads(line) for line in self.redis.lrange(f"{PREFIX}logs:{request_id}", 0, -1)]
        return [
            {
                "message": line["message"],
                "level": line["level"],
                "source": "USER",
                "timestamp": datetime.fromtimestamp(line["at"], UTC).isoformat(timespec="milliseconds"),
            }
            for line in lines
        ]

    def request_cancel(self, request_id: str) -> None:
        self.redis.set(f"{PREFIX}cancel:{request_id}", 1, ex=self.retention_s)

    def cancel_requested(self, request_id: str) -> bool:
        """A front-end asked to cancel it, or this worker lost its lease on it: stop either way."""
        return request_id in self._lost or bool(self.redis.exists(f"{PREFIX}cancel:{request_id}"))

    def requeue_interrupted(self) -> int:
        """Nothing to do at start-up: a dead worker's requests are claimed again after the visibility timeout."""
        return 0

    def purge(self, completed_before: float) -> int:
        """Nothing to do: completed records and logs expire by themselves (EXPIRE at completion)."""
        return 0

    # Uploads: the upload as JSON with an expiry; its parts in a hash (base64: this client decodes replies as text),
    # their sizes in another
    def add_upload(self, token: str, upload: dict, ttl_s: float) -> None:
        self.redis.set(f"{PREFIX}upload:{token}", json.dumps(upload), px=int(ttl_s * 1000))

    def get_upload(self, token: str) -> dict | None:
        value = self.redis.get(f"{PREFIX}upload:{token}")
        return json.loads(value) if value else None

    def add_upload_part(self, token: str, number: int, data: bytes) -> int:
        key, sizes = f"{PREFIX}upload-parts:{token}", f"{PREFIX}upload-sizes:{token}"
        ttl_ms = max(1, self.redis.pttl(f"{PREFIX}upload:{token}"))  # the parts expire with their upload
        pipe = self.redis.pipeline()
        pipe.hset(key, str(number), base64.b64encode(data).decode())
        pipe.hset(sizes, str(number), len(data))
        pipe.pexpire(key, ttl_ms)
        pipe.pexpire(sizes, ttl_ms)
        pipe.execute()
        return sum(self.upload_part_sizes(token).values())

    def upload_part_sizes(self, token: str) -> dict[int, int]:
        sizes = self.redis.hgetall(f"{PREFIX}upload-sizes:{token}")
        return {int(number): int(size) for number, size in sizes.items()}

    def pending_upload_bytes(self) -> int:
        keys = self.redis.scan_iter(match=f"{PREFIX}upload-sizes:*", count=1000)
        return sum(int(size) for key in keys for size in self.redis.hvals(key))

    def upload_parts(self, token: str) -> dict[int, bytes]:
        parts = self.redis.hgetall(f"{PREFIX}upload-parts:{token}")
        return {int(number): base64.b64decode(data) for number, data in parts.items()}

    def remove_upload(self, token: str) -> bool:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(f"{PREFIX}upload:{token}")
            pipe.delete(f"{PREFIX}upload-parts:{token}", f"{PREFIX}upload-sizes:{token}")
            removed, _ = pipe.execute()
        return removed > 0

    # pending webhook deliveries: one hash (request id -> delivery), and a lease key per delivery held by the
    # process sending it (SET NX: of two processes, only one takes a delivery whose lease ran out)
    def save_webhook(self, request_id: str, delivery: dict, lease_s: float) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(f"{PREFIX}webhooks", request_id, json.dumps(delivery))
            pipe.set(f"{PREFIX}webhook-lease:{request_id}", self.consumer, px=max(1, int(lease_s * 1000)))
            pipe.execute()

    def webhook_done(self, request_id: str) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(f"{PREFIX}webhooks", request_id)
            pipe.delete(f"{PREFIX}webhook-lease:{request_id}")
            pipe.execute()

    def take_webhooks(self, lease_s: float) -> list[dict]:
        taken = []
        for key, delivery in self.redis.hgetall(f"{PREFIX}webhooks").items():
            request_id = str(key)  # already str (decode_responses); said so for the type checker
            lease = f"{PREFIX}webhook-lease:{request_id}"
            if self.redis.set(lease, self.consumer, nx=True, px=max(1, int(lease_s * 1000))):
                if self.redis.hexists(f"{PREFIX}webhooks", request_id):  # not delivered meanwhile
                    taken.append(json.loads(delivery))
                else:
                    self.redis.delete(lease)
        return taken

    def heartbeat(self, worker_id: str, info: dict, ttl_s: float) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(f"{PREFIX}worker:{worker_id}", json.dumps(info), px=int(ttl_s * 1000))
            pipe.sadd(WORKERS, worker_id)
            pipe.execute()

    def workers(self) -> list[dict]:
        """The workers whose advertisement has not expired: the set of ids, then their keys (no keyspace scan);
        ids whose advertisement expired leave the set."""
        ids = sorted(cast(set[str], self.redis.smembers(WORKERS)))
        values = self.redis.mget([f"{PREFIX}worker:{i}" for i in ids]) if ids else []
        gone = [i for i, value in zip(ids, values, strict=True) if value is None]
        if gone:
            self.redis.srem(WORKERS, *gone)
        return [{"id": i, **json.loads(value)} for i, value in zip(ids, values, strict=True) if value is not None]

    def close(self) -> None:
        self._closing.set()
        if self._listener is not None:
            self._listener.join(timeout=5)  # it checks `_closing` every second
        self.redis.close()


for _name in ANSWERED:
    setattr(RedisQueue, _name, _answers_outages(getattr(RedisQueue, _name)))
