"""The Redis queue backend against a real redis-server on loopback, in-process (no model): ordering, positions,
profiles, exactly-once completion, cancel flags, abandoned and released requests, heartbeats, retention; fencing
(only the current claim's holder records an outcome), renewal by progress, the shared lease."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from types import SimpleNamespace

import pytest

from benchmarks.loopback import start_redis
from server.config import Settings
from server.files.storage import LocalStorage
from server.queue.backend import QueueBackend
from server.queue.connect import open_queue
from server.queue.dispatcher import Dispatcher
from server.schemas import EditOutput, ImageFile

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


# Fencing and leases (issue 19, items 8 and 9): only the holder of a request's current claim records its outcome;
# progress renews the claim; a claim whose step hangs stops being renewed; all workers share one lease.


def test_only_the_current_lease_holder_records_an_outcome(redis_url):
    stalled, other = queue(redis_url, "stalled"), queue(redis_url, "other")
    add(stalled, "r")
    assert stalled.claim(ALL).id == "r"
    stalled._closing.set()  # it stalls (a SIGSTOPped process): its claim is not renewed
    time.sleep(1.2)
    assert other.claim(ALL).id == "r"  # taken over: the claim's lease (fencing token) is now `other`'s
    assert other.redis.hget("flux2:req:r", "lease") == "2"
    stalled.progress("r", 3, 4)  # it comes back: its progress is refused, and it learns it lost the request
    assert stalled.lease_lost("r") and stalled.cancel_requested("r")  # its run stops at this step
    assert other.get("r").progress_step is None and not other.lease_lost("r")
    delivery = {"request_id": "r", "url": "http://hook", "body": "{}", "attempts_made": 0, "next_at": 0}
    # fenced, though the request has no outcome yet; and its webhook is not kept either
    assert not stalled.complete("r", 200, {"images": ["stale"]}, webhook=delivery, webhook_lease_s=60)
    assert not other.redis.hexists("flux2:webhooks", "r")
    assert other.get("r").status == "IN_PROGRESS"
    other.progress("r", 1, 4)
    assert other.get("r").progress_step == 1
    assert other.complete("r", 200, {"images": []})
    assert other.get("r").result == {"images": []}


def test_a_stale_claim_can_not_release_or_renew_the_new_one(redis_url):
    stalled, other = queue(redis_url, "stalled"), queue(redis_url, "other")
    add(stalled, "r")
    stalled.claim(ALL)
    stalled._closing.set()
    time.sleep(1.2)
    assert other.claim(ALL).id == "r"
    stalled.release("r", attempt_failed=True)  # its failure handling, late: it must not requeue `other`'s run
    assert other.get("r").status == "IN_PROGRESS"
    assert other.complete("r", 200, {})


def test_progress_renews_the_claim(redis_url):
    busy, other = queue(redis_url, "busy"), queue(redis_url, "other")
    add(busy, "r")
    assert busy.claim(ALL).id == "r"
    busy._closing.set()  # no renewal by the timer thread: only by the steps
    for step in range(1, 5):
        time.sleep(0.4)
        busy.progress("r", step, 4)
        assert other.claim(ALL) is None  # 1.6 s in all, past the 1 s lease: each step renewed it
    assert busy.complete("r", 200, {})


def test_a_claim_whose_step_hangs_is_not_renewed_past_the_step_timeout(redis_url):
    hung = open_queue(redis_url, None, retention_s=60, visibility_timeout_s=1.0, consumer="hung", step_timeout_s=0.5)
    OPENED.append(hung)
    other = queue(redis_url, "other")
    add(hung, "r")
    assert hung.claim(ALL).id == "r"  # ... and no step ever ends; its timer thread runs every 0.33 s
    time.sleep(0.8)
    assert other.claim(ALL) is None  # renewed while the step is within its bound
    time.sleep(1.2)
    assert other.claim(ALL).id == "r"  # then not: another worker takes it over


def test_every_worker_uses_the_lease_the_first_one_stored(redis_url):
    first = queue(redis_url, "first")  # 1 s
    add(first, "r")
    assert first.claim(ALL).id == "r"  # the first claim stores its lease: flux2:lease-ms
    assert first.redis.get("flux2:lease-ms") == "1000"
    first._closing.set()  # no renewal for a while
    impatient = open_queue(redis_url, None, retention_s=60, visibility_timeout_s=0.1, consumer="impatient")
    OPENED.append(impatient)
    time.sleep(0.4)  # past the impatient worker's own setting, within the shared lease
    assert impatient.claim(ALL) is None and impatient.visibility_ms == 1000  # it adopted the shared lease
    time.sleep(0.8)
    assert impatient.claim(ALL).id == "r"  # past the shared lease: abandoned


def test_a_request_a_worker_failed_goes_to_another_worker_first(redis_url):
    broken = open_queue(redis_url, None, retention_s=60, visibility_timeout_s=1.0, consumer="b", retry_elsewhere_s=0.5)
    OPENED.append(broken)
    good = queue(redis_url, "good")
    for name in ("r", "s", "t"):
        add(broken, name)
    assert broken.claim(ALL).id == "r"
    broken.release("r", attempt_failed=True)  # its own failure (its model, its storage)
    assert broken.get("r").status == "IN_QUEUE"
    assert broken.claim(ALL).id == "s"  # not `r` again: left to other workers for a while
    taken = good.claim(ALL)
    assert taken.id == "r" and taken.attempts == 2
    broken.release("s", attempt_failed=True)
    time.sleep(0.6)  # no other worker took `s` within the while: its own turn again (within the attempts limit)
    again = broken.claim(ALL)
    assert again.id == "s" and again.attempts == 2


def test_a_stalled_workers_result_is_refused_and_its_files_deleted(redis_url, tmp_path):
    """The dispatcher of a worker that stalled after writing its output, while another worker took the request
    over, comes back first: its result is not recorded, its file is deleted, and the other worker's is recorded."""
    stalled, other = queue(redis_url, "stalled"), queue(redis_url, "other")
    storage = LocalStorage(tmp_path / "files")
    written = tmp_path / "files" / "stale.png"

    class Service:  # the edit service as the dispatcher sees it: its run writes a file, then stalls
        settings = Settings(data_dir=tmp_path)
        outputs = SimpleNamespace(storage=storage)
        metrics = SimpleNamespace(job_finished=lambda *args: None)
        resume: asyncio.Event

        async def edit(self, *args, **kwargs) -> EditOutput:
            storage.put("stale.png", b"png", "image/png")
            await self.resume.wait()
            image = ImageFile(url="http://fe/files/stale.png", file_name="stale.png")
            return EditOutput(images=[image], timings={}, seed=1, has_nsfw_concepts=[False], prompt="p")

    body = json.dumps({"prompt": "p", "image_urls": ["http://fe/files/in.png"]})
    stalled.add("r", FLASH, body, 0, "http://fe/queue/fal-ai/flux-2", "http://fe/", None, None)

    async def scenario():
        service = Service()
        service.resume = asyncio.Event()
        dispatcher = Dispatcher(stalled, service, None)  # type: ignore[arg-type]
        running = asyncio.create_task(dispatcher._run(stalled.claim(ALL)))
        while not written.exists():
            await asyncio.sleep(0.01)
        stalled._closing.set()  # it stalls while encoding: its claim is not renewed
        await asyncio.sleep(1.2)
        assert other.claim(ALL).id == "r"
        service.resume.set()  # it comes back before the other worker finishes
        await running

    asyncio.run(scenario())
    assert not written.exists()  # the loser's output: deleted
    assert other.get("r").status == "IN_PROGRESS"  # not recorded
    assert other.complete("r", 200, {"images": []})
    assert other.get("r").result == {"images": []}
