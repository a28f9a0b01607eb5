"""The queue on Redis (redis-py), for API front-ends and GPU workers in separate processes and machines.

Layout (all keys under `flux2:`):
- `req:{id}`: a hash, the request record (the `QueuedRequest` fields, plus `stream`, `entry`, `worker`,
  `attempts`). Kept without expiry until completed, then for the retention period.
- `q:{priority}:{endpoint_id}`: one Redis Stream per priority and endpoint; an entry carries a request id. The
  consumer group `workers` hands each entry to one worker (XREADGROUP); a worker reads only the streams of the
  endpoints its model runs, higher priority first, then the oldest entry. The entry stays pending until the
  request completes; the claiming worker touches it every `visibility_timeout_s / 3`, so an entry idle longer
  than `visibility_timeout_s` belongs to a worker that died, and the next worker to look claims it (XAUTOCLAIM):
  at-least-once delivery.
- `logs:{id}`: a list of log lines (JSON), appended by the worker, read by whichever front-end answers status.
- `cancel:{id}`: set by a front-end, polled by the running worker after every denoising step.
- `worker:{id}`: a worker's advertisement (JSON), expiring unless its heartbeat renews it.

Claiming and completing are Lua scripts (atomic in Redis): a request is claimed by one worker at a time and
completed exactly once, even if two workers ran it (a worker that stalled past the visibility timeout).

Durability is Redis's: run it with `appendonly yes` (and `appendfsync always` for an accepted submit to survive a
power cut, as the SQLite queue's does).
"""

from __future__ import annotations

import asyncio
import base64
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

from server.endpoints import ENDPOINTS
from server.queue.backend import PRIORITIES, QueuedRequest

log = logging.getLogger(__name__)

PREFIX = "flux2:"
GROUP = "workers"
COMPLETED_CHANNEL = f"{PREFIX}completed"  # pub/sub: the id of each request as it completes
INT_FIELDS = {"seq", "priority", "status_code", "attempts", "progress_step", "progress_total"}
FLOAT_FIELDS = {"start_deadline", "created_at", "started_at", "completed_at"}
RECORD_FIELDS = [f.name for f in fields(QueuedRequest) if f.name != "input"]  # what `get` reads

ADD = """
local seq = redis.call('INCR', KEYS[3])
local entry = redis.call('XADD', KEYS[2], seq .. '-0', 'id', ARGV[1])  -- ids in arrival order across streams
redis.call('HSET', KEYS[1], 'seq', seq, 'stream', KEYS[2], 'entry', entry, 'status', 'IN_QUEUE', 'attempts', 0,
           unpack(ARGV, 2))
return seq
"""

# KEYS: the streams this worker reads, in serve order; ARGV: consumer, now, visibility (ms), prefix, reserve (1: the
# request stays IN_QUEUE, held by this worker: `reserve`), then the priority of each stream. Returns {request id,
# previous worker or ''} or {false, last entry id of each stream}.
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
  local previous = redis.call('HGET', key, 'worker') or ''
  if reserve == '1' then
    redis.call('HSET', key, 'status', 'IN_QUEUE', 'worker', consumer, 'reserved', consumer)
    redis.call('HDEL', key, 'started_at')
  else
    redis.call('HSET', key, 'status', 'IN_PROGRESS', 'started_at', now, 'worker', consumer)
    redis.call('HDEL', key, 'reserved')
    redis.call('HINCRBY', key, 'attempts', 1)
  end
  return {rid, previous}
end

-- 1. entries abandoned by a worker that stopped touching them (crashed, or released at shutdown)
for _, stream in ipairs(KEYS) do
  local found = redis.call('XAUTOCLAIM', stream, group, consumer, idle_ms, '0-0', 'COUNT', 1)
  for _, e in ipairs(found[2]) do
    local taken = take(stream, e[1], e[2][2])
    if taken then return taken end
  end
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

# KEYS: request hash, its logs, its cancel flag; ARGV: only_if_queued, retention (s), then field/value pairs.
COMPLETE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'COMPLETED' then return 0 end
if ARGV[1] == '1' and status ~= 'IN_QUEUE' then return 0 end
redis.call('HDEL', KEYS[1], 'error', 'error_type')
redis.call('HSET', KEYS[1], 'status', 'COMPLETED', unpack(ARGV, 3))
local place = redis.call('HMGET', KEYS[1], 'stream', 'entry')
redis.call('XACK', place[1], 'workers', place[2])
redis.call('XDEL', place[1], place[2])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[3])
return 1
"""

# KEYS: request hash; ARGV: consumer, idle (ms) to set, release (1/0), uncount the attempt (1/0). Touches a
# claimed or reserved entry (idle 0), or gives it up (idle past the visibility timeout, so the next worker claims it
# at once), if this consumer still owns it.
TOUCH = """
local r = redis.call('HMGET', KEYS[1], 'status', 'worker', 'stream', 'entry', 'reserved')
local held = r[1] == 'IN_PROGRESS' or (r[1] == 'IN_QUEUE' and r[5] == ARGV[1])
if not held or r[2] ~= ARGV[1] then return 0 end
redis.call('XCLAIM', r[3], 'workers', ARGV[1], 0, r[4], 'IDLE', ARGV[2], 'JUSTID')
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'status', 'IN_QUEUE')
  redis.call('HDEL', KEYS[1], 'reserved')
end
if ARGV[4] == '1' and r[1] == 'IN_PROGRESS' then  -- a graceful stop: not an attempt (a reserved one was none yet)
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
end
return 1
"""

# KEYS: request hash, ARGV: consumer, now. A request this consumer reserved is IN_PROGRESS now, its attempt counted
# (1), or 0.
START = """
local r = redis.call('HMGET', KEYS[1], 'status', 'reserved', 'stream', 'entry')
if r[1] ~= 'IN_QUEUE' or r[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'IN_PROGRESS', 'started_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'reserved')
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('XCLAIM', r[3], 'workers', ARGV[1], 0, r[4], 'IDLE', 0, 'JUSTID')
return 1
"""

# Delivered entries whose request is still IN_QUEUE (reserved by a worker fetching its inputs, or given back) are
# queued all the same: counted by POSITION and QUEUED. There are few (a handful per worker).
STILL_QUEUED = """
local function still_queued(stream, first, last, prefix)
  local n = 0
  for _, p in ipairs(redis.call('XPENDING', stream, 'workers', first, last, 10000)) do
    local e = redis.call('XRANGE', stream, p[1], p[1])[1]
    if e and redis.call('HGET', prefix .. 'req:' .. e[2][2], 'status') == 'IN_QUEUE' then n = n + 1 end
  end
  return n
end
"""

# KEYS: request hash. How many queued entries are served before this request's.
POSITION = (
    STILL_QUEUED
    + """
local r = redis.call('HMGET', KEYS[1], 'status', 'stream', 'entry', 'priority')
if r[1] ~= 'IN_QUEUE' then return 0 end
local prefix = string.match(KEYS[1], '^(.*)req:')
local count = 0
for i = 2, #ARGV, 2 do
  local stream, priority = ARGV[i - 1], tonumber(ARGV[i])
  if priority <= tonumber(r[4]) and redis.call('EXISTS', stream) == 1 then
    local last = '0-0'
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
      for j = 1, #g, 2 do if g[j] == 'last-delivered-id' then last = g[j + 1] end end
    end
    local stop = priority < tonumber(r[4]) and '+' or '(' .. r[3]
    count = count + #redis.call('XRANGE', stream, '(' .. last, stop) + still_queued(stream, '-', stop, prefix)
  end
end
return count
"""
)

# KEYS: every stream; ARGV: prefix. Requests accepted and not started.
QUEUED = (
    STILL_QUEUED
    + """
local count = 0
for _, stream in ipairs(KEYS) do
  count = count + redis.call('XLEN', stream) - redis.call('XPENDING', stream, 'workers')[1]
  count = count + still_queued(stream, '-', '+', ARGV[1])
end
return count
"""
)


def _encode(value) -> str:
    return str(value)


def _decode(record: dict) -> QueuedRequest:
    values: dict = dict(record)
    for name in INT_FIELDS & values.keys():
        values[name] = int(values[name])
    for name in FLOAT_FIELDS & values.keys():
        values[name] = float(values[name])
    return QueuedRequest.from_mapping(values)


class RedisQueue:
    distributed = True  # requests are run by `flux2-server worker` processes

    def __init__(self, url: str, retention_s: float, visibility_timeout_s: float = 30.0, consumer: str | None = None):
        self.redis = redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)
        self.retention_s = max(1, int(retention_s))
        self.visibility_ms = int(visibility_timeout_s * 1000)
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.streams = [  # every stream, in serve order
            (f"{PREFIX}q:{priority}:{e.endpoint_id}", priority, e.endpoint_id)
            for priority in sorted(PRIORITIES.values())
            for e in ENDPOINTS
        ]
        for stream, _, _ in self.streams:
            try:
                self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._add = self.redis.register_script(ADD)
        self._claim = self.redis.register_script(CLAIM)
        self._complete = self.redis.register_script(COMPLETE)
        self._touch = self.redis.register_script(TOUCH)
        self._position = self.redis.register_script(POSITION)
        self._start = self.redis.register_script(START)
        self._queued = self.redis.register_script(QUEUED)
        self._last_ids: dict[str, str] = {}
        self._claimed: set[str] = set()  # requests this process runs; their entries are touched
        self._closing = threading.Event()
        self._toucher: threading.Thread | None = None
        # sync callers on this front-end waiting for a request a worker runs: woken by its completion message
        self._completion_waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._listener: threading.Thread | None = None
        self._listening = threading.Event()

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
        return int(self._queued(keys=[stream for stream, _, _ in self.streams], args=[PREFIX]))

    def start(self, request_id: str) -> bool:
        started = bool(self._start(keys=[self._key(request_id)], args=[self.consumer, time.time()]))
        if started:
            self.log(request_id, f"Running on worker {self.consumer}")
        else:  # finished meanwhile (a queued cancel), or taken over: not renewed any more
            self._claimed.discard(request_id)
        return started

    def claim(self, endpoint_ids: Collection[str], reserve: bool = False) -> QueuedRequest | None:
        streams = [(s, p) for s, p, e in self.streams if e in endpoint_ids]
        args: list = [self.consumer, time.time(), self.visibility_ms, PREFIX, int(reserve), *(p for _, p in streams)]
        found = self._claim(keys=[s for s, _ in streams], args=args)
        if not found[0]:
            self._last_ids = dict(zip((s for s, _ in streams), found[1], strict=True))
            return None
        request_id, previous = found
        if not reserve:
            self.log(request_id, f"Running on worker {self.consumer}")
        if previous:
            message = f"Worker {previous} stopped before finishing this request: it runs again on {self.consumer}"
            log.warning("request %s: %s", request_id, message)
            self.log(request_id, message, "WARNING")
        self._claimed.add(request_id)
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
        """Keep this process's claimed entries fresh, so no other worker takes them over while they run."""
        while not self._closing.wait(self.visibility_ms / 3000):
            for request_id in list(self._claimed):
                try:
                    self._touch(keys=[self._key(request_id)], args=[self.consumer, 0, 0, 0])
                except redis.RedisError as exc:
                    log.warning("could not renew the claim on request %s: %s", request_id, exc)

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
        stop's claim is not counted as an attempt."""
        self._claimed.discard(request_id)
        uncount = 0 if attempt_failed else 1
        self._touch(keys=[self._key(request_id)], args=[self.consumer, self.visibility_ms + 1, 1, uncount])

    def complete(
        self,
        request_id: str,
        status_code: int,
        result: dict,
        error: str | None = None,
        error_type: str | None = None,
        metrics: dict | None = None,
        only_if_queued: bool = False,
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
        done = bool(self._complete(keys=keys, args=["1" if only_if_queued else "0", self.retention_s, *pairs]))
        if done:
            self.redis.publish(COMPLETED_CHANNEL, request_id)  # wakes the front-end a sync caller waits on
        if done or not only_if_queued:
            self._claimed.discard(request_id)
        return done

    def log(self, request_id: str, message: str, level: str = "INFO") -> None:
        line = json.dumps({"at": time.time(), "level": level, "message": message})
        self.redis.rpush(f"{PREFIX}logs:{request_id}", line)

    def progress(self, request_id: str, step: int, total: int) -> None:
        self.redis.hset(self._key(request_id), mapping={"progress_step": step, "progress_total": total})

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
        return bool(self.redis.exists(f"{PREFIX}cancel:{request_id}"))

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
        self.redis.set(f"{PREFIX}worker:{worker_id}", json.dumps(info), px=int(ttl_s * 1000))

    def workers(self) -> list[dict]:
        keys = sorted(self.redis.scan_iter(match=f"{PREFIX}worker:*", count=1000))
        values = self.redis.mget(keys) if keys else []
        return [
            {"id": key.removeprefix(f"{PREFIX}worker:"), **json.loads(value)}
            for key, value in zip(keys, values, strict=True)
            if value is not None
        ]

    def close(self) -> None:
        self._closing.set()
        if self._listener is not None:
            self._listener.join(timeout=5)  # it checks `_closing` every second
        self.redis.close()
