"""Queued requests, their status, logs and results, persisted in SQLite under the data directory.

The default `QueueBackend` (see `server.queue.backend`): one process accepts requests and runs them.

Every accepted request is a row before its submit call answers, so a crash loses nothing: at start-up, rows left
IN_PROGRESS by a killed server go back to IN_QUEUE and run again. sqlite3 is the standard library's; one
connection is shared by the event loop and the inference thread (which appends step logs) behind a lock.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Collection
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path

from server.queue.backend import SYNC, QueuedRequest

# every column of `requests` but the input: what `get` (status, result, cancel) reads
RECORD_COLUMNS = ", ".join(f.name for f in fields(QueuedRequest) if f.name != "input")

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- arrival order
    id TEXT UNIQUE NOT NULL,
    endpoint_id TEXT NOT NULL,
    input TEXT NOT NULL,                     -- '' (the input is in `inputs`; a queue written before: here)
    priority INTEGER NOT NULL,
    status TEXT NOT NULL,                    -- IN_QUEUE, IN_PROGRESS, COMPLETED
    queue_url TEXT NOT NULL,                 -- base of this request's status/result/cancel URLs
    files_url TEXT NOT NULL,                 -- base of its output file URLs
    webhook_url TEXT,
    start_deadline REAL,                     -- X-Fal-Request-Timeout: fail if not started by then
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    status_code INTEGER,                     -- HTTP status of the result
    result TEXT,                             -- the result body, as JSON (output or fal error shape)
    error TEXT,
    error_type TEXT,
    metrics TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,     -- times started; a start interrupted by a graceful stop is not counted
    progress_step INTEGER,                   -- denoising steps done ...
    progress_total INTEGER,                  -- ... of this many
    owner TEXT,                              -- SHA-256 of the submitting API key; NULL: open API (or older row)
    reserved INTEGER NOT NULL DEFAULT 0      -- 1: IN_QUEUE, held by the dispatcher fetching its inputs (`reserve`)
);
CREATE INDEX IF NOT EXISTS queued ON requests (status, priority, seq);
CREATE TABLE IF NOT EXISTS inputs (          -- apart from the rows status reads: inputs can be 100 MB data URIs
    id TEXT PRIMARY KEY,
    input TEXT NOT NULL                      -- the validated input, as JSON
);
CREATE TABLE IF NOT EXISTS logs (
    request_id TEXT NOT NULL,
    at REAL NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_by_request ON logs (request_id, at);
CREATE TABLE IF NOT EXISTS uploads (             -- uploads begun through the storage emulation
    token TEXT PRIMARY KEY,
    upload TEXT NOT NULL,                    -- JSON
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS webhooks (            -- webhook deliveries not yet made
    request_id TEXT PRIMARY KEY,
    delivery TEXT NOT NULL,                  -- JSON: url, body, attempts_made, next_at
    lease_until REAL NOT NULL                -- the process sending it holds it until then
);
CREATE TABLE IF NOT EXISTS upload_parts (
    token TEXT NOT NULL,
    number INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (token, number)
);
"""


class RequestStore:
    distributed = False  # this process runs what it queues

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL with synchronous=NORMAL survives a crash of this process (SIGKILL) at every commit; a power cut may
        # lose the last commits. Queued submits alone are written with FULL (see `add`): an answered submit survives
        # that too, while per-step log lines don't wait on the disk.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(requests)")}
        if "attempts" not in columns:  # a queue written before attempts were counted
            self._db.execute("ALTER TABLE requests ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")
        for column in ("progress_step", "progress_total"):  # ... or before progress was
            if column not in columns:
                self._db.execute(f"ALTER TABLE requests ADD COLUMN {column} INTEGER")
        if "owner" not in columns:  # ... or before owners were (its rows: NULL, any key sees them, as before)
            self._db.execute("ALTER TABLE requests ADD COLUMN owner TEXT")
        if "reserved" not in columns:  # ... or before inputs were fetched ahead
            self._db.execute("ALTER TABLE requests ADD COLUMN reserved INTEGER NOT NULL DEFAULT 0")
        self._cancel_requested: set[str] = set()  # running requests to stop at their next step (this process)
        self._workers: dict[str, tuple[float, dict]] = {}  # worker id -> (expires, info)

    def _one(self, sql: str, *args) -> QueuedRequest | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return QueuedRequest.from_mapping(dict(row)) if row else None

    def _write(self, sql: str, *args) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def requeue_interrupted(self) -> int:
        """Put requests a stopped server left running back in the queue, each with a log line saying so; returns
        how many."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM requests WHERE status='IN_PROGRESS'").fetchall()
        for row in rows:
            self.log(row["id"], "The server stopped while running this request; it was re-queued.", "WARNING")
        self._write("UPDATE requests SET reserved=0 WHERE reserved=1")  # still queued: held by the stopped server
        return self._write("UPDATE requests SET status='IN_QUEUE', started_at=NULL WHERE status='IN_PROGRESS'")

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
        deadline = now + start_timeout_s if start_timeout_s else None
        # A sync request (queue_url SYNC) lives only as long as its caller's connection to this process: after a
        # crash or a power cut nobody awaits it and it is refused, not run (Dispatcher._refusal). So its row is
        # not worth an fsync before its model call starts (5-20 ms of a lone request's latency on this machine).
        durable = queue_url != SYNC
        with self._lock:
            if durable:
                self._db.execute("PRAGMA synchronous=FULL")
            try:
                self._db.execute("BEGIN")
                self._db.execute("INSERT INTO inputs (id, input) VALUES (?, ?)", (request_id, input_json))
                self._db.execute(
                    "INSERT INTO requests (id, endpoint_id, input, priority, status, queue_url, files_url,"
                    " webhook_url, start_deadline, created_at, owner) VALUES (?, ?, '', ?, 'IN_QUEUE', ?, ?, ?, ?, ?, ?)",
                    (request_id, endpoint_id, priority, queue_url, files_url, webhook_url, deadline, now, owner),
                )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            finally:
                if durable:
                    self._db.execute("PRAGMA synchronous=NORMAL")

    def get(self, request_id: str) -> QueuedRequest | None:
        return self._one(f"SELECT {RECORD_COLUMNS} FROM requests WHERE id = ?", request_id)

    def next_queued(self) -> QueuedRequest | None:
        return self._one(
            f"SELECT {RECORD_COLUMNS} FROM requests WHERE status='IN_QUEUE' ORDER BY priority, seq LIMIT 1"
        )

    def input_of(self, request_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT input FROM inputs WHERE id=?", (request_id,)).fetchone()
            if row is None:  # queued before inputs were kept apart
                row = self._db.execute("SELECT input FROM requests WHERE id=?", (request_id,)).fetchone()
        return row[0] if row else None

    def position(self, request: QueuedRequest) -> int:
        """How many queued requests will be served before this one."""
        with self._lock:
            (count,) = self._db.execute(
                "SELECT COUNT(*) FROM requests WHERE status='IN_QUEUE' AND (priority < ? OR (priority = ? AND seq < ?))",
                (request.priority, request.priority, request.seq),
            ).fetchone()
        return count

    def queued_ids(self, endpoint_ids: Collection[str]) -> list[str]:
        marks = ",".join("?" * len(endpoint_ids))
        with self._lock:
            rows = self._db.execute(
                f"SELECT id FROM requests WHERE status='IN_QUEUE' AND endpoint_id IN ({marks}) ORDER BY seq",
                tuple(endpoint_ids),
            ).fetchall()
        return [row[0] for row in rows]

    def queued_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM requests WHERE status='IN_QUEUE'").fetchone()[0]

    def claim(self, endpoint_ids: Collection[str], reserve: bool = False) -> QueuedRequest | None:
        """The next queued request for one of `endpoint_ids` (not reserved), marked IN_PROGRESS, or with `reserve`
        held (still IN_QUEUE) until `start`."""
        mark = self._mark_reserved if reserve else self.mark_started
        marks = ",".join("?" * len(endpoint_ids))
        while True:
            request = self._one(
                f"SELECT {RECORD_COLUMNS} FROM requests WHERE status='IN_QUEUE' AND reserved=0"
                f" AND endpoint_id IN ({marks}) ORDER BY priority, seq LIMIT 1",
                *endpoint_ids,
            )
            if request is None:
                return None
            if mark(request.id):
                taken = self.get(request.id)
                if taken is not None:
                    taken.input = self.input_of(request.id)
                return taken

    def start(self, request_id: str) -> bool:
        """A reserved request is IN_PROGRESS now, its attempt counted; False if it was finished meanwhile."""
        return bool(
            self._write(
                "UPDATE requests SET status='IN_PROGRESS', started_at=?, attempts=attempts+1, reserved=0"
                " WHERE id=? AND status='IN_QUEUE' AND reserved=1",
                time.time(),
                request_id,
            )
        )

    def _mark_reserved(self, request_id: str) -> bool:
        return bool(
            self._write("UPDATE requests SET reserved=1 WHERE id=? AND status='IN_QUEUE' AND reserved=0", request_id)
        )

    async def wait_for_work(self, wakeup: asyncio.Event, timeout_s: float) -> None:
        """Submits to this process set `wakeup` (Dispatcher.notify)."""
        try:
            await asyncio.wait_for(wakeup.wait(), timeout_s)
        except TimeoutError:
            pass

    async def wait_completed(self, request_id: str, timeout_s: float) -> None:
        """Only this process runs what it queues, and its sync callers await the dispatcher itself: a short wait."""
        await asyncio.sleep(min(timeout_s, 0.05))

    def release(self, request_id: str, attempt_failed: bool = False) -> None:
        """After a worker failure: back in the queue now, the attempt counted. At a graceful stop: left IN_PROGRESS
        (this process is the only one that runs requests, and `requeue_interrupted` puts it back in the queue at
        its next start, as after a crash) with the attempt not counted. A reserved request is simply queued again."""
        self._write("UPDATE requests SET reserved=0 WHERE id=? AND status='IN_QUEUE' AND reserved=1", request_id)
        if attempt_failed:
            self._write(
                "UPDATE requests SET status='IN_QUEUE', started_at=NULL WHERE id=? AND status='IN_PROGRESS'",
                request_id,
            )
        else:
            self._write(
                "UPDATE requests SET attempts=MAX(attempts-1, 0) WHERE id=? AND status='IN_PROGRESS'", request_id
            )

    def request_cancel(self, request_id: str) -> None:
        self._cancel_requested.add(request_id)

    def cancel_requested(self, request_id: str) -> bool:
        return request_id in self._cancel_requested

    def lease_lost(self, request_id: str) -> bool:
        """Never: this process alone runs its queue, and no claim lapses (a run the step watchdog gave up on is
        COMPLETED, and `complete` refuses a second outcome)."""
        return False

    def heartbeat(self, worker_id: str, info: dict, ttl_s: float) -> None:
        self._workers[worker_id] = (time.time() + ttl_s, info)

    def health(self) -> dict | None:
        return None

    def workers(self) -> list[dict]:
        now = time.time()
        return [{"id": wid, **info} for wid, (expires, info) in self._workers.items() if expires > now]

    def mark_started(self, request_id: str) -> bool:
        """IN_QUEUE -> IN_PROGRESS; False if it is no longer queued (cancelled meanwhile) or is reserved."""
        return bool(
            self._write(
                "UPDATE requests SET status='IN_PROGRESS', started_at=?, attempts=attempts+1"
                " WHERE id=? AND status='IN_QUEUE' AND reserved=0",
                time.time(),
                request_id,
            )
        )

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
        """Record the outcome (with its webhook delivery, in the same transaction); with `only_if_queued`, only if
        the request has not started (a queued cancel)."""
        condition = "status='IN_QUEUE'" if only_if_queued else "status!='COMPLETED'"
        if not only_if_queued:
            self._cancel_requested.discard(request_id)
        with self._lock:
            self._db.execute("BEGIN")
            try:
                recorded = self._db.execute(
                    f"UPDATE requests SET status='COMPLETED', completed_at=?, status_code=?, result=?, error=?,"
                    f" error_type=?, metrics=? WHERE id=? AND {condition}",
                    (
                        time.time(),
                        status_code,
                        json.dumps(result),
                        error,
                        error_type,
                        json.dumps(metrics or {}),
                        request_id,
                    ),
                ).rowcount
                if recorded and webhook is not None:
                    self._db.execute(
                        "INSERT OR REPLACE INTO webhooks (request_id, delivery, lease_until) VALUES (?, ?, ?)",
                        (request_id, json.dumps(webhook), time.time() + webhook_lease_s),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return bool(recorded)

    def log(self, request_id: str, message: str, level: str = "INFO") -> None:
        self._write(
            "INSERT INTO logs (request_id, at, level, message) VALUES (?, ?, ?, ?)",
            request_id,
            time.time(),
            level,
            message,
        )

    def progress(self, request_id: str, step: int, total: int) -> None:
        self._write("UPDATE requests SET progress_step=?, progress_total=? WHERE id=?", step, total, request_id)

    def logs(self, request_id: str) -> list[dict]:
        """fal's log objects: message, level, source, timestamp (ISO 8601, UTC)."""
        with self._lock:
            cursor = self._db.execute(
                "SELECT at, level, message FROM logs WHERE request_id=? ORDER BY at", (request_id,)
            )
            rows = cursor.fetchall()
        return [
            {
                "message": row["message"],
                "level": row["level"],
                "source": "USER",
                "timestamp": datetime.fromtimestamp(row["at"], UTC).isoformat(timespec="milliseconds"),
            }
            for row in rows
        ]

    def expired(self, completed_before: float) -> list[QueuedRequest]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {RECORD_COLUMNS} FROM requests WHERE status='COMPLETED' AND completed_at < ?",
                (completed_before,),
            ).fetchall()
        return [QueuedRequest.from_mapping(dict(row)) for row in rows]

    def delete(self, request_ids: list[str]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            for request_id in request_ids:
                self._db.execute("DELETE FROM logs WHERE request_id=?", (request_id,))
                self._db.execute("DELETE FROM inputs WHERE id=?", (request_id,))
                self._db.execute("DELETE FROM requests WHERE id=?", (request_id,))
            self._db.execute("COMMIT")

    def purge(self, completed_before: float) -> int:
        expired = [r.id for r in self.expired(completed_before)]
        self.delete(expired)
        return len(expired)

    def add_upload(self, token: str, upload: dict, ttl_s: float) -> None:
        now = time.time()
        with self._lock:  # forget expired ones first
            self._db.execute(
                "DELETE FROM upload_parts WHERE token IN (SELECT token FROM uploads WHERE expires < ?)", (now,)
            )
            self._db.execute("DELETE FROM uploads WHERE expires < ?", (now,))
            self._db.execute(
                "INSERT INTO uploads (token, upload, expires) VALUES (?, ?, ?)",
                (token, json.dumps(upload), now + ttl_s),
            )

    def get_upload(self, token: str) -> dict | None:
        with self._lock:
            row = self._db.execute(
                "SELECT upload FROM uploads WHERE token=? AND expires >= ?", (token, time.time())
            ).fetchone()
        return json.loads(row["upload"]) if row else None

    def add_upload_part(self, token: str, number: int, data: bytes) -> int:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO upload_parts (token, number, data) VALUES (?, ?, ?)", (token, number, data)
            )
            return self._db.execute("SELECT SUM(LENGTH(data)) FROM upload_parts WHERE token=?", (token,)).fetchone()[0]

    def upload_parts(self, token: str) -> dict[int, bytes]:
        with self._lock:
            rows = self._db.execute("SELECT number, data FROM upload_parts WHERE token=?", (token,)).fetchall()
        return {row["number"]: bytes(row["data"]) for row in rows}

    def upload_part_sizes(self, token: str) -> dict[int, int]:
        with self._lock:
            rows = self._db.execute("SELECT number, LENGTH(data) FROM upload_parts WHERE token=?", (token,)).fetchall()
        return {row[0]: row[1] for row in rows}

    def pending_upload_bytes(self) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT SUM(LENGTH(data)) FROM upload_parts WHERE token IN (SELECT token FROM uploads WHERE expires >= ?)",
                (time.time(),),
            ).fetchone()
        return row[0] or 0

    def remove_upload(self, token: str) -> bool:
        with self._lock:
            self._db.execute("DELETE FROM upload_parts WHERE token=?", (token,))
            return self._db.execute("DELETE FROM uploads WHERE token=?", (token,)).rowcount > 0

    def save_webhook(self, request_id: str, delivery: dict, lease_s: float) -> None:
        self._write(
            "INSERT OR REPLACE INTO webhooks (request_id, delivery, lease_until) VALUES (?, ?, ?)",
            request_id,
            json.dumps(delivery),
            time.time() + lease_s,
        )

    def webhook_done(self, request_id: str) -> None:
        self._write("DELETE FROM webhooks WHERE request_id=?", request_id)

    def take_webhooks(self, lease_s: float) -> list[dict]:
        now = time.time()
        with self._lock:
            rows = self._db.execute("SELECT request_id, delivery FROM webhooks WHERE lease_until < ?", (now,))
            taken = [(row["request_id"], json.loads(row["delivery"])) for row in rows.fetchall()]
            for request_id, _ in taken:
                self._db.execute("UPDATE webhooks SET lease_until=? WHERE request_id=?", (now + lease_s, request_id))
        return [delivery for _, delivery in taken]

    def close(self) -> None:
        with self._lock:
            self._db.close()
