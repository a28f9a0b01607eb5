"""Open the queue a URL names: the embedded SQLite queue, or Redis shared by front-ends and workers."""

from __future__ import annotations

import fcntl
import os
import sqlite3
from pathlib import Path
from typing import IO

from server.logs import redacted
from server.queue.backend import QueueBackend


def open_queue(url: str | None, data_dir: Path, retention_s: float, **redis_options) -> QueueBackend:
    """`None` or `sqlite:///path`: the embedded SQLite queue (default `<data_dir>/queue.sqlite3`);
    `redis://host:port/db` (or `rediss://`, `unix://`): the Redis Streams queue."""
    if url is None or url.startswith("sqlite:"):
        from server.queue.sqlite_queue import RequestStore

        return RequestStore(sqlite_path(url, data_dir))
    if url.startswith(("redis://", "rediss://", "unix://")):
        from server.queue.redis_queue import RedisQueue

        return RedisQueue(url, retention_s=retention_s, **redis_options)
    raise ValueError(f"unknown queue URL {redacted(url)!r}: use redis://host:port/db or sqlite:///path")


def sqlite_path(url: str | None, data_dir: Path) -> Path:
    return Path(url.removeprefix("sqlite://")) if url and url != "sqlite://" else data_dir / "queue.sqlite3"


class QueueInUse(Exception):
    """Another server holds this SQLite queue."""


def lock_local_queue(settings) -> IO | None:
    """With the embedded SQLite queue, take an exclusive lock (`<queue file>.lock`, flock) that lasts as long as
    this process: a second server on the same data directory would re-queue the request the first one runs.
    Raises QueueInUse naming the holder's pid; None (no lock needed) with a shared queue."""
    if settings.queue is not None and not settings.queue.startswith("sqlite:"):
        return None
    path = sqlite_path(settings.queue, settings.data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = (path.parent / (path.name + ".lock")).open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise QueueInUse(
            f"another flux2-server (pid {holder}) is serving the queue in {path.parent}: stop it, or give this "
            "one its own --data-dir"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def local_queue_problem(settings) -> str | None:
    """Why the embedded SQLite queue can't be used (a corrupt or foreign file), checked before the model loads;
    None when it can (or does not exist yet, or the queue is shared)."""
    if settings.queue is not None and not settings.queue.startswith("sqlite:"):
        return None
    path = sqlite_path(settings.queue, settings.data_dir)
    if not path.exists():
        return None
    try:
        with sqlite3.connect(path) as db:
            (verdict,) = db.execute("PRAGMA quick_check").fetchone()
    except sqlite3.DatabaseError as exc:
        verdict = str(exc)
    return None if verdict == "ok" else f"the queue database {path} is unusable ({verdict}): restore or move it away"


def open_configured_queue(settings, consumer: str) -> QueueBackend:
    """The queue `settings` name (FLUX2_QUEUE...), as `serve` and `worker` open it; `consumer` names this process."""
    return open_queue(
        settings.queue,
        settings.data_dir,
        settings.retention_s,
        visibility_timeout_s=settings.queue_visibility_timeout_s,
        consumer=consumer,
        timeout_s=settings.queue_timeout_s,
        ca_file=str(settings.queue_ca_file) if settings.queue_ca_file else None,
        step_timeout_s=settings.step_timeout_s,
        retry_elsewhere_s=settings.breaker_cooldown_s,
    )
