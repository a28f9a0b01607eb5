"""The `QueueBackend` contract, run over both backends: the embedded SQLite queue and Redis (a real redis-server
on loopback; skipped without Debian's binary). What the routes and the dispatcher rely on holds for each."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest

from benchmarks.loopback import start_redis
from server.queue.backend import QueueBackend
from server.queue.connect import open_queue

EDIT, TURBO, FLASH = "fal-ai/flux-2/edit", "fal-ai/flux-2/turbo/edit", "fal-ai/flux-2/flash/edit"
ALL = [EDIT, TURBO, FLASH]


@pytest.fixture(params=["sqlite", "redis"])
def queue(request, tmp_path):
    if request.param == "sqlite":
        opened = open_queue(None, tmp_path, retention_s=1)
        yield opened
        opened.close()
        return
    if shutil.which("redis-server") is None:
        pytest.skip("needs Debian's redis-server binary")
    process, url = start_redis(tmp_path / "redis")
    # retry_elsewhere_s=0: a request released after a failure may come back to this (only) consumer at once
    opened = open_queue(url, tmp_path, retention_s=1, visibility_timeout_s=30, consumer="contract", retry_elsewhere_s=0)
    yield opened
    opened.close()
    process.terminate()
    process.wait(timeout=10)


def add(q: QueueBackend, request_id: str, endpoint: str = FLASH, priority: int = 0) -> None:
    q.add(request_id, endpoint, '{"prompt": "p"}', priority, "http://fe/queue/fal-ai/flux-2", "http://fe/", None, None)


def test_requests_are_served_by_priority_then_arrival_with_positions(queue):
    assert isinstance(queue, QueueBackend)
    for name, endpoint, priority in [("low", EDIT, 1), ("a", FLASH, 0), ("b", EDIT, 0)]:
        add(queue, name, endpoint, priority)
    assert queue.queued_count() == 3
    assert [queue.position(queue.get(n)) for n in ("a", "b", "low")] == [0, 1, 2]
    assert queue.get("a").status == "IN_QUEUE"
    assert queue.claim([TURBO]) is None  # only what the caller's profiles run
    claims = [queue.claim(ALL) for _ in range(3)]
    assert [c.id for c in claims] == ["a", "b", "low"] and claims[0].input == '{"prompt": "p"}'
    assert queue.claim(ALL) is None and queue.queued_count() == 0
    claimed = queue.get("a")
    assert claimed.status == "IN_PROGRESS" and claimed.attempts == 1 and claimed.started_at > 0


def test_an_outcome_is_recorded_exactly_once(queue):
    add(queue, "r")
    assert queue.complete("r", 400, {"detail": "x"}) is True
    assert queue.complete("r", 200, {"images": []}) is False  # already has one
    done = queue.get("r")
    assert (done.status, done.status_code, done.result) == ("COMPLETED", 400, {"detail": "x"})
    add(queue, "s")
    queue.claim(ALL)
    assert queue.complete("s", 400, {}, only_if_queued=True) is False  # started: not a queued cancel


def test_an_outcome_and_its_webhook_delivery_are_kept_in_one_step(queue):
    """A worker that dies right after recording an outcome leaves its webhook to another process, never lost."""
    add(queue, "r")
    queue.claim(ALL)
    delivery = {"request_id": "r", "url": "http://hook", "body": "{}", "attempts_made": 0, "next_at": 1.0}
    assert queue.complete("r", 200, {}, webhook=delivery, webhook_lease_s=0.05)
    time.sleep(0.1)  # the recorder died: its lease on the delivery runs out
    assert queue.take_webhooks(lease_s=60) == [delivery]
    queue.webhook_done("r")
    assert not queue.complete("r", 500, {}, webhook={**delivery, "body": "late"}, webhook_lease_s=0)  # no second
    time.sleep(0.05)
    assert queue.take_webhooks(lease_s=60) == []


def test_a_failed_attempt_goes_back_to_the_queue_counted(queue):
    add(queue, "r")
    queue.claim(ALL)
    queue.release("r", attempt_failed=True)
    assert queue.get("r").status == "IN_QUEUE"
    again = queue.claim(ALL)
    assert again.id == "r" and again.attempts == 2


def test_logs_progress_and_cancel_flags(queue):
    add(queue, "r")
    queue.claim(ALL)
    queue.log("r", "step 1/4")
    queue.log("r", "oops", "WARNING")
    lines = [(log["message"], log["level"]) for log in queue.logs("r")]
    assert lines[-2:] == [("step 1/4", "INFO"), ("oops", "WARNING")]  # after what the backend logs itself
    assert queue.get("r").progress_step is None
    queue.progress("r", 3, 4)
    assert (queue.get("r").progress_step, queue.get("r").progress_total) == (3, 4)
    assert not queue.cancel_requested("r")
    queue.request_cancel("r")
    assert queue.cancel_requested("r")


def test_uploads_and_their_parts_are_kept_until_removed_or_expired(queue):
    queue.add_upload("t", {"name": "upload-1.png", "content_type": "image/png"}, ttl_s=60)
    assert queue.get_upload("t") == {"name": "upload-1.png", "content_type": "image/png"}
    assert queue.get_upload("nope") is None
    assert queue.add_upload_part("t", 2, b"world") == 5
    assert queue.add_upload_part("t", 1, b"hello ") == 11
    assert queue.add_upload_part("t", 1, b"hi ") == 8  # a part sent again replaces it
    assert queue.upload_parts("t") == {1: b"hi ", 2: b"world"}
    queue.remove_upload("t")
    assert queue.get_upload("t") is None and queue.upload_parts("t") == {}
    queue.add_upload("short", {"name": "x"}, ttl_s=0.05)
    time.sleep(0.1)
    assert queue.get_upload("short") is None


def test_pending_webhooks_are_kept_and_taken_once_their_lease_runs_out(queue):
    delivery = {"request_id": "r", "url": "http://hook", "body": "{}", "attempts_made": 2, "next_at": 1.0}
    queue.save_webhook("r", delivery, lease_s=60)  # its process holds it
    queue.save_webhook("s", {**delivery, "request_id": "s"}, lease_s=0.05)  # ... and this one's process stopped
    time.sleep(0.1)
    assert queue.take_webhooks(lease_s=60) == [{**delivery, "request_id": "s"}]
    assert queue.take_webhooks(lease_s=60) == []  # taken: leased to the taker now
    queue.webhook_done("r")
    queue.save_webhook("s", {**delivery, "request_id": "s", "attempts_made": 3}, lease_s=0.05)
    time.sleep(0.1)
    assert queue.take_webhooks(lease_s=60) == [{**delivery, "request_id": "s", "attempts_made": 3}]
    queue.webhook_done("s")
    time.sleep(0.1)
    assert queue.take_webhooks(lease_s=0) == []


def test_workers_advertise_until_their_heartbeat_expires(queue):
    queue.heartbeat("w1", {"profiles": ["flash"]}, ttl_s=0.2)
    assert queue.workers() == [{"id": "w1", "profiles": ["flash"]}]
    time.sleep(0.3)
    assert queue.workers() == []


def test_completed_requests_are_gone_after_retention(queue):
    """Retention is 1 s here: SQLite's sweep (`purge`) deletes them; Redis lets them expire."""
    add(queue, "old")
    queue.complete("old", 200, {})
    add(queue, "waiting")
    time.sleep(1.2)
    queue.purge(time.time() - 1)
    assert queue.get("old") is None and queue.get("waiting") is not None


def test_a_waiting_caller_is_woken_when_its_request_completes(queue):
    """A sync caller on a front-end waits for a worker elsewhere: the completion wakes it (Redis: pub/sub), long
    before its own timeout (a minute here)."""
    add(queue, "r")
    queue.claim(ALL)

    async def wait_then_complete():
        waiting = asyncio.create_task(queue.wait_completed("r", timeout_s=60))
        await asyncio.sleep(0.2)  # the waiter is registered
        await asyncio.to_thread(queue.complete, "r", 200, {})
        await asyncio.wait_for(waiting, 30)

    asyncio.run(wait_then_complete())
    assert queue.get("r").status == "COMPLETED"


def test_upload_part_sizes_and_pending_bytes(queue):
    queue.add_upload("a", {"name": "a"}, ttl_s=60)
    queue.add_upload("b", {"name": "b"}, ttl_s=60)
    queue.add_upload_part("a", 1, b"12345")
    queue.add_upload_part("a", 2, b"123")
    queue.add_upload_part("b", 1, b"12")
    queue.add_upload_part("a", 2, b"1")  # sent again: replaces it
    assert queue.upload_part_sizes("a") == {1: 5, 2: 1} and queue.upload_part_sizes("none") == {}
    assert queue.pending_upload_bytes() == 8
    queue.remove_upload("a")
    assert queue.upload_part_sizes("a") == {} and queue.pending_upload_bytes() == 2


def test_status_reads_never_carry_the_input(queue):
    """Inputs (data URIs up to the body limit) are stored apart: `get` (status, result, cancel) leaves them out,
    `claim` brings them."""
    big = '{"prompt": "p", "image_urls": ["data:image/png;base64,' + "A" * 2_000_000 + '"]}'
    queue.add("big", FLASH, big, 0, "http://fe/queue/fal-ai/flux-2", "http://fe/", None, None)
    assert queue.get("big").input is None and queue.get("big").status == "IN_QUEUE"
    claimed = queue.claim(ALL)
    assert claimed.id == "big" and claimed.input == big
    assert queue.get("big").input is None and queue.get("big").status == "IN_PROGRESS"


def test_a_request_keeps_its_owner_through_its_life(queue):
    """The owner (a hash of the submitting key: server/http/auth.py) is recorded with the request and read back by
    `get` at every stage; a request submitted on an open API has none."""
    owner = "ab" * 32
    queue.add("mine", FLASH, "{}", 0, "http://fe/queue/fal-ai/flux-2", "http://fe/", None, None, owner=owner)
    add(queue, "open")
    assert queue.get("mine").owner == owner and queue.get("open").owner is None
    assert queue.claim(ALL).owner == owner
    queue.complete("mine", 200, {"images": []})
    assert queue.get("mine").owner == owner


def test_a_reserved_request_stays_queued_for_everyone_else_until_started(queue):
    """`reserve` (inputs fetched ahead of the model): still IN_QUEUE with an honest position and queue depth, kept
    from other claims; `start` makes it IN_PROGRESS; a queued cancel finishes it, and then it can't start."""
    for name in ("a", "b", "c"):
        add(queue, name)
    held = queue.claim(ALL, reserve=True)
    assert held.id == "a" and held.input == '{"prompt": "p"}'
    assert queue.get("a").status == "IN_QUEUE" and queue.get("a").attempts == 0  # counted when it starts
    assert queue.queued_count() == 3
    assert [queue.position(queue.get(n)) for n in ("a", "b", "c")] == [0, 1, 2]
    assert queue.claim(ALL, reserve=True).id == "b"
    assert queue.claim(ALL).id == "c"  # reserved ones are not claimed again
    assert queue.claim(ALL) is None and queue.claim(ALL, reserve=True) is None
    assert queue.start("a") is True
    started = queue.get("a")
    assert started.status == "IN_PROGRESS" and started.started_at > 0 and started.attempts == 1
    assert queue.start("a") is False  # started once
    assert queue.complete("b", 400, {"detail": "cancelled"}, only_if_queued=True) is True  # a queued cancel
    assert queue.start("b") is False and queue.get("b").status == "COMPLETED"
    assert queue.queued_count() == 0


def test_a_released_reservation_is_queued_again_without_counting_the_attempt(queue):
    add(queue, "a")
    add(queue, "b")
    assert queue.claim(ALL, reserve=True).id == "a"
    queue.release("a")  # a graceful stop gives its prefetched requests back
    assert queue.get("a").status == "IN_QUEUE" and queue.get("a").attempts == 0
    assert queue.position(queue.get("b")) == 1
    again = queue.claim(ALL)
    assert again.id == "a" and again.attempts == 1
