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
import redis

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


def test_an_abandoned_request_behind_ten_live_ones_is_claimed(redis_url):
    """XAUTOCLAIM looks at 10 pending entries per COUNT: the claim follows its cursor past the live ones."""
    busy, dead, alive = queue(redis_url, "busy"), queue(redis_url, "dead"), queue(redis_url, "alive")
    for i in range(12):
        add(busy, f"live-{i}")
    add(busy, "abandoned")
    assert [busy.claim(ALL).id for _ in range(12)] == [f"live-{i}" for i in range(12)]  # renewed while they run
    assert dead.claim(ALL).id == "abandoned"
    dead._closing.set()  # it stops renewing its claim, as a killed process would
    time.sleep(1.3)
    assert alive.claim(ALL).id == "abandoned"


def test_queue_positions_count_released_requests(redis_url):
    """A released request is served before new ones: positions say so (not off by one per released request)."""
    front, worker = queue(redis_url, "front"), queue(redis_url, "worker")
    add(front, "a")
    add(front, "b")
    assert worker.claim(ALL).id == "a"
    worker.release("a")  # back in the queue, ahead of b
    add(front, "c")
    add(front, "low", EDIT, priority=1)
    positions = {n: front.position(front.get(n)) for n in ["a", "b", "c", "low"]}
    assert positions == {"a": 0, "b": 1, "c": 2, "low": 3}
    assert front.queued_count() == 4
    assert [worker.claim(ALL).id for _ in range(4)] == ["a", "b", "c", "low"]
    assert front.queued_count() == 0


def test_logs_of_a_request_cancelled_while_queued_expire(redis_url):
    front = queue(redis_url, "front")
    add(front, "r")
    assert front.complete("r", 400, {"detail": "c"}, "c", "request_cancelled", only_if_queued=True)
    front.log("r", "Request was cancelled", "WARNING")  # written after completion, as Dispatcher.cancel does
    assert 0 < front.redis.ttl("flux2:logs:r") <= 60
    front.log("gone", "a line for a record that is not there")
    assert 0 < front.redis.ttl("flux2:logs:gone") <= 60


def test_a_redis_that_comes_back_empty_is_prepared_again_and_says_what_was_lost(redis_url):
    """FLUSHALL (as a restart without persistence): the consumer groups are created again by whichever process
    notices, new requests run, and /health's `queue` says when Redis was found empty and what was lost."""
    front, worker = queue(redis_url, "front"), queue(redis_url, "worker")
    add(front, "before")
    assert front.health() == {"reachable": True}
    front.redis.flushall()
    add(front, "after")  # a front-end keeps accepting
    assert worker.claim(ALL).id == "after"  # NOGROUP: the groups are created again, the new entry served
    assert worker.complete("after", 200, {"images": []})
    assert front.get("before") is None
    health = front.health()
    assert health["reachable"] and health["reset_at"] == pytest.approx(time.time(), abs=30)
    assert "every request accepted before this time" in health["lost"]
    assert queue(redis_url, "started-later").health() == health  # every process sees it


def test_an_unreachable_redis_raises_queue_unavailable_without_its_address(tmp_path, caplog):
    """Redis down at start and meanwhile: opening the queue works, calls answer QueueUnavailable (a 503 with
    Retry-After, no address or password), and the queue serves again once Redis is back on its port."""
    from benchmarks.loopback import free_port
    from server.errors import QueueUnavailable, answer_for

    port = free_port()
    url = f"redis://:s3cret@127.0.0.1:{port}/0"
    q = open_queue(url, None, retention_s=60, visibility_timeout_s=1.0, consumer="c", timeout_s=0.5)
    OPENED.append(q)
    with pytest.raises(QueueUnavailable) as raised:
        add(q, "r")
    answer = answer_for(raised.value)
    assert answer.status == 503 and answer.headers["Retry-After"] == "5" and answer.error_type == "queue_unavailable"
    assert str(port) not in json.dumps(answer.body) and "s3cret" not in json.dumps(answer.body)
    assert f"redis://:***@127.0.0.1:{port}/0" in caplog.text and "s3cret" not in caplog.text  # the log: no password
    process, _ = start_redis(tmp_path / "redis", port=port)
    try:
        process_url = f"redis://127.0.0.1:{port}/0"
        redis.Redis.from_url(process_url).config_set("requirepass", "s3cret")
        add(q, "r")
        assert q.claim(ALL).id == "r" and q.health() == {"reachable": True}
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_health_calls_do_not_grow_with_the_keyspace(redis_url):
    """/health's queue calls (health, queued_count, workers) send the same Redis commands with 10 or 2000 keys: no
    SCAN. Counted by the server (INFO commandstats)."""
    q = queue(redis_url, "front")
    q.heartbeat("gpu-0", {"profiles": ["edit"]}, ttl_s=30)

    def commands() -> dict:
        q.redis.config_resetstat()
        q.health(), q.queued_count(), q.workers()
        stats = q.redis.info("commandstats")
        return {name: s["calls"] for name, s in stats.items() if name not in ("cmdstat_config", "cmdstat_info")}

    few = commands()
    for i in range(1000):
        add(q, f"r{i}")
        q.log(f"r{i}", "a line")
    assert commands() == few
    assert "cmdstat_scan" not in few and sum(few.values()) <= 10 + 3 * len(q.streams), few  # per stream: a few


def test_a_status_read_moves_kilobytes_not_the_input(redis_url):
    """Inputs (up to the body limit) are stored with the request but never read by status: a status read of a
    request with a 19 MB input moves a few kilobytes from Redis (INFO's total_net_output_bytes)."""
    q = queue(redis_url, "front")
    big = json.dumps({"prompt": "p", "image_urls": ["data:image/png;base64," + "A" * 19_000_000]})
    q.add("big", FLASH, big, 0, "http://fe/queue/fal-ai/flux-2", "http://fe/", None, None)
    q.log("big", "a line")

    def sent() -> int:
        return q.redis.info("stats")["total_net_output_bytes"]

    before = sent()
    request = q.get("big")  # what GET .../status reads: the record, its position and its logs
    q.position(request), q.logs("big")
    status_bytes = sent() - before
    print(f"status read of a request with a 19 MB input: {status_bytes} bytes from Redis")
    assert status_bytes < 20_000  # INFO's own reply included
    assert len(q.redis.hget("flux2:req:big", "input")) == len(big)  # the input is there, for the worker's claim


def test_a_front_end_refuses_and_expires_requests_no_live_worker_serves(redis_url, tmp_path):
    """An API front-end (in this process) on the shared queue: a submit for a profile no live worker serves is
    refused at once (503, Retry-After); one accepted while a worker served it fails with 503 once its profile has
    gone unserved for FLUX2_QUEUE_UNSERVED_TIMEOUT_S."""
    from fastapi.testclient import TestClient

    from server.config import Settings
    from server.http.app import create_app

    settings = Settings(
        data_dir=tmp_path / "data",
        queue=redis_url,
        allowed_hosts="testserver",
        worker_heartbeat_ttl_s=1,
        queue_unserved_timeout_s=1,
    )
    body = {"prompt": "p", "image_urls": ["https://example.com/a.png"]}
    with TestClient(create_app(settings, None)) as client:
        refused = client.post(f"/queue/{FLASH}", json=body)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json() == {
            "detail": f"No worker serves {FLASH} at the moment (profile 'flash'); try again later"
        }
        worker = queue(redis_url, "gpu")
        worker.heartbeat("gpu-0", {"profiles": ["turbo", "flash"]}, ttl_s=1.5)  # then it is gone
        accepted = client.post(f"/queue/{FLASH}", json=body)
        assert accepted.status_code == 200, accepted.text
        assert client.post(f"/queue/{EDIT}", json=body).status_code == 503  # no live worker runs `edit`
        status_url = accepted.json()["status_url"].replace("http://testserver", "")
        deadline = time.monotonic() + 20
        while (status := client.get(status_url).json())["status"] != "COMPLETED":
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        assert status["error_type"] == "unavailable" and "No worker served profile 'flash'" in status["error"]
        assert client.get(accepted.json()["response_url"].replace("http://testserver", "")).status_code == 503
        # output URLs under the /files/ of the front-end that took the submit are answered as this one's
        worker.heartbeat("gpu-0", {"profiles": ["flash"]}, ttl_s=30)
        other = client.post(f"/queue/{FLASH}", json=body).json()["request_id"]
        image = {"url": "http://10.0.0.9:8000/files/x.png", "file_name": "x.png"}
        worker.redis.hset(f"flux2:req:{other}", "files_url", "http://10.0.0.9:8000/")
        assert worker.claim(ALL).id == other and worker.complete(other, 200, {"images": [image], "seed": 1})
        result = client.get(f"/queue/fal-ai/flux-2/requests/{other}").json()
        assert result["images"][0]["url"] == "http://testserver/files/x.png"


def test_a_tls_redis_with_its_own_ca(tmp_path):
    """`rediss://` to a redis-server serving TLS with a certificate from a private CA: trusted with
    FLUX2_QUEUE_CA_FILE (`ca_file`), refused (unreachable) without it."""
    import subprocess

    from benchmarks.loopback import free_port
    from server.cli.tls import make_certificates
    from server.errors import QueueUnavailable

    files = make_certificates(["127.0.0.1"], tmp_path / "tls")
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", ""]
        + ["--tls-cert-file", str(tmp_path / "tls" / "server.pem"), "--tls-key-file"]
        + [str(tmp_path / "tls" / "server-key.pem"), "--tls-auth-clients", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    try:
        url = f"rediss://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 30
        while True:
            trusted = open_queue(url, None, retention_s=60, consumer="tls", ca_file=str(files["ca"]))
            OPENED.append(trusted)
            try:
                add(trusted, "r")
                break
            except QueueUnavailable:
                assert time.monotonic() < deadline, "redis-server did not start with TLS"
                time.sleep(0.1)
        assert trusted.claim(ALL).id == "r"
        untrusted = open_queue(url, None, retention_s=60, consumer="no-ca", timeout_s=2)
        OPENED.append(untrusted)
        with pytest.raises(QueueUnavailable):
            untrusted.get("r")
    finally:
        process.terminate()
        process.wait(timeout=10)


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
