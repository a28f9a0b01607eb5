"""Open the queue a URL names: the embedded SQLite queue, or Redis shared by front-ends and workers."""

from __future__ import annotations

from pathlib import Path

from server.queue.backend import QueueBackend


def open_queue(url: str | None, data_dir: Path, retention_s: float, **redis_options) -> QueueBackend:
    """`None` or `sqlite:///path`: the embedded SQLite queue (default `<data_dir>/queue.sqlite3`);
    `redis://host:port/db` (or `rediss://`, `unix://`): the Redis Streams queue."""
    if url is None or url.startswith("sqlite:"):
        from server.queue.sqlite_queue import RequestStore

        path = Path(url.removeprefix("sqlite://")) if url and url != "sqlite://" else data_dir / "queue.sqlite3"
        return RequestStore(path)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from server.queue.redis_queue import RedisQueue

        return RedisQueue(url, retention_s=retention_s, **redis_options)
    raise ValueError(f"unknown queue URL {url!r}: use redis://host:port/db or sqlite:///path")


def open_configured_queue(settings, consumer: str) -> QueueBackend:
    """The queue `settings` name (FLUX2_QUEUE...), as `serve` and `worker` open it; `consumer` names this process."""
    return open_queue(
        settings.queue,
        settings.data_dir,
        settings.retention_s,
        visibility_timeout_s=settings.queue_visibility_timeout_s,
        consumer=consumer,
    )
