"""The Redis queue backend against a real redis-server on loopback, in-process (no model): ordering, positions,
profiles, exactly-once completion, cancel flags, abandoned and released requests, heartbeats, retention."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest

from benchmarks.loopback import start_redis
from server.queue.backend import QueueBackend
from server.queue.connect import open_queue

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs Debian's redis-server binary")

EDIT, TURBO, FLASH = "fal-ai/flux-2/edit", "fal-ai/flux-2/turbo/edit", "fal-ai/flux-2/flash/edit"
ALL = [EDIT, TURBO, FLASH]


OPENED = []


@pytest.fixture
def redis_url(tmp_path):
    process, url = start_redis(tmp_path / "redis")
    yield url
    while OPENED:
        OPENED.pop().close()
    process.terminate()
    process.wait(timeout=10)


def queue(url, consumer):
    opened = open_queue(url, None, retention_s=60, visibility_timeout_s=1.0, consumer=consumer)
    OPENED.append(opened)
    return opened


def add(q, request_id, endpoint=FLASH, priority=0, timeout=None):
    q.add(request_id, endpoint, "{}", priority, "http://fe/queue/fal-ai/flux-2", "http://fe/", None, timeout)


def test_both_backends_implement_the_interface(redis_url, tmp_path):
    redis_queue, sqlite_queue = queue(redis_url, "a"), open_queue(None, tmp_path, retention_s=60)
    assert isinstance(redis_queue, QueueBackend) and redis_queue.distributed
    assert isinstance(sqlite_queue, QueueBackend) and not sqlite_queue.distributed
    sqlite_queue.close()


def test_priority_then_arrival_across_endpoints_and_positions(redis_url):
    a = queue(redis_url, "a")
    for name, endpoint, priority in [("low-1", EDIT, 1), ("n-1", FLASH, 0), ("n-2", EDIT, 0), ("low-2", TURBO, 1)]:
        add(a, name, endpoint, priority)
    assert a.queued_count() == 4
    assert {n: a.position(a.get(n)) for n in ["n-1", "n-2", "low-1", "low-2"]} == {
        "n-1": 0,
        "n-2": 1,
        "low-1": 2,
        "low-2": 3,
    }
    taken = [a.claim(ALL).id for _ in range(4)]
    assert taken == ["n-1", "n-2", "low-1", "low-2"]
    assert a.claim(ALL) is None and a.queued_count() == 0
    assert a.get("n-1").status == "IN_PROGRESS" and a.get("n-1").started_at > 0


def test_a_worker_takes_only_what_its_profiles_run(redis_url):
    edit_only, fast_only = queue(redis_url, "edit-only"), queue(redis_url, "fast-only")
    add(edit_only, "e", EDIT)
    add(edit_only, "f", FLASH)
    assert fast_only.claim([TURBO, FLASH]).id == "f"
    assert fast_only.claim([TURBO, FLASH]) is None
    assert edit_only.claim([EDIT]).id == "e"


def test_completion_is_exactly_once_and_expires(redis_url):
    a, b = queue(redis_url, "a"), queue(redis_url, "b")
    add(a, "r")
    assert a.claim(ALL).id == "r"
    assert a.complete("r", 200, {"images": []}, metrics={"inference_time": 1.0})
    assert not b.complete("r", 500, {"detail": "late duplicate"}, "x", "inference_error")
    done = b.get("r")
    assert done.status == "COMPLETED" and done.status_code == 200 and done.error is None
    assert 0 < a.redis.ttl("flux2:req:r") <= 60
    assert a.claim(ALL) is None  # acknowledged: never delivered again


def test_cancel_queued_and_running(redis_url):
    front, worker = queue(redis_url, "front"), queue(redis_url, "worker")
    add(front, "running")
    add(front, "queued")
    assert worker.claim(ALL).id == "running"
    assert not front.complete("running", 400, {"detail": "c"}, only_if_queued=True)  # started: not at once
    front.request_cancel("running")
    assert worker.cancel_requested("running") and not worker.cancel_requested("queued")
    assert front.complete("queued", 400, {"detail": "c"}, "c", "request_cancelled", only_if_queued=True)
    assert front.queued_count() == 0 and worker.claim(ALL) is None
    assert worker.complete("running", 400, {"detail": "c"}, "c", "request_cancelled")
    assert not worker.cancel_requested("running")


def test_an_abandoned_request_is_claimed_by_another_worker(redis_url):
    dead, alive = queue(redis_url, "dead"), queue(redis_url, "alive")
    add(dead, "r")
    assert dead.claim(ALL).id == "r"
    dead._closing.set()  # it stops renewing its claim, as a killed process would
    assert alive.claim(ALL) is None  # within the visibility timeout it still belongs to `dead`
    time.sleep(1.2)
    taken = alive.claim(ALL)
    assert taken.id == "r" and taken.status == "IN_PROGRESS"
    assert alive.redis.hget("flux2:req:r", "attempts") == "2"
    assert any("Worker dead stopped before finishing" in line["message"] for line in alive.logs("r"))
    assert alive.complete("r", 200, {})
    assert not dead.complete("r", 200, {})  # the first worker, coming back late, can't complete it again


def test_a_running_claim_is_renewed_while_it_runs(redis_url):
    busy, other = queue(redis_url, "busy"), queue(redis_url, "other")
    add(busy, "r")
    assert busy.claim(ALL).id == "r"
    time.sleep(1.5)  # longer than the visibility timeout, but `busy` renews its claim
    assert other.claim(ALL) is None


def test_released_request_goes_to_the_next_worker_at_once(redis_url):
    stopping, other = queue(redis_url, "stopping"), queue(redis_url, "other")
    add(stopping, "r")
    assert stopping.claim(ALL).id == "r"
    stopping.release("r")
    assert other.get("r").status == "IN_QUEUE"
    assert other.claim(ALL).id == "r"


def test_start_timeout_deadline_is_kept(redis_url):
    a = queue(redis_url, "a")
    add(a, "r", timeout=5)
    r = a.get("r")
    assert r.start_deadline == pytest.approx(r.created_at + 5)


def test_wait_for_work_returns_when_work_arrives(redis_url):
    worker, front = queue(redis_url, "w"), queue(redis_url, "f")

    async def scenario():
        assert worker.claim(ALL) is None
        started = time.monotonic()
        await worker.wait_for_work(asyncio.Event(), 0.3)
        assert time.monotonic() - started >= 0.25  # nothing came: waited the timeout
        asyncio.get_running_loop().call_later(0.1, add, front, "r")
        started = time.monotonic()
        await worker.wait_for_work(asyncio.Event(), 5)
        assert time.monotonic() - started < 2
        assert worker.claim(ALL).id == "r"

    asyncio.run(scenario())


def test_heartbeats_expire(redis_url):
    a = queue(redis_url, "a")
    a.heartbeat("gpu-0", {"profiles": ["edit"], "device": "cuda:0"}, ttl_s=0.5)
    assert a.workers() == [{"id": "gpu-0", "profiles": ["edit"], "device": "cuda:0"}]
    time.sleep(0.7)
    assert a.workers() == []


def test_logs_are_shared(redis_url):
    worker, front = queue(redis_url, "w"), queue(redis_url, "f")
    add(front, "r")
    worker.log("r", "step 1/4")
    assert [line["message"] for line in front.logs("r")] == ["step 1/4"]
    assert front.logs("r")[0]["timestamp"].endswith("+00:00")


def test_a_reserved_claim_is_renewed_and_handed_over_when_its_worker_dies(redis_url):
    """A request reserved while its inputs are fetched ahead is held like a running one: renewed past the
    visibility timeout, and taken by another worker once its holder stops renewing it."""
    holder, other = queue(redis_url, "holder"), queue(redis_url, "other")
    add(holder, "r")
    assert holder.claim(ALL, reserve=True).id == "r"
    time.sleep(1.5)  # longer than the visibility timeout
    assert other.claim(ALL) is None and other.get("r").status == "IN_QUEUE"
    holder._closing.set()  # it stops renewing, as a killed process would
    time.sleep(1.2)
    assert other.claim(ALL).id == "r"
    assert holder.start("r") is False  # no longer its own
