"""The edit service and the dispatcher in-process, with tests/fake_editor.py for the model: every call reaches the
model through the dispatcher, in arrival order, sync and queued alike; queue positions count sync calls; sync_mode
images never go into the queue row; cancel, OOM and failures answer as the API says. Fast: no model, no process."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient

from benchmarks.loopback import start_redis
from pipelines import Cancelled
from tests.conftest import data_uri, image_bytes
from tests.fake_editor import FakeEditor

BODY = {"prompt": "p", "image_urls": [data_uri(image_bytes(64, 64))], "image_size": "square", "seed": 1}
FLASH, TURBO = "fal-ai/flux-2/flash/edit", "fal-ai/flux-2/turbo/edit"


def wait_status(client: TestClient, handle: dict, wanted: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while (status := client.get(handle["status_url"]).json())["status"] != wanted:
        assert time.monotonic() < deadline, status
        time.sleep(0.01)
    return status


def test_sync_calls_wait_in_the_queue_in_arrival_order_and_count_in_positions(fake_server):
    editor = FakeEditor(step_s=0.05)
    client, app = fake_server(editor)
    first = client.post(f"/queue/{FLASH}", json={**BODY, "seed": 1}).json()  # runs first (4 steps)
    wait_status(client, first, "IN_PROGRESS")
    with ThreadPoolExecutor(1) as pool:
        sync = pool.submit(client.post, f"/{TURBO}", json={**BODY, "seed": 2})
        deadline = time.monotonic() + 30
        while app.state.services.store.queued_count() < 1:  # the sync call is queued behind the first
            assert time.monotonic() < deadline
            time.sleep(0.01)
        last = client.post(f"/queue/{FLASH}", json={**BODY, "seed": 3}).json()
        assert last["queue_position"] == 1  # the waiting sync call is ahead of it
        assert sync.result().status_code == 200
    wait_status(client, last, "COMPLETED")
    assert [call.seed for call in editor.calls] == [1, 2, 3]  # one path to the model, in arrival order


def test_sync_mode_images_go_to_the_caller_not_into_the_queue_row(fake_server):
    client, app = fake_server(FakeEditor())
    answer = client.post(f"/{FLASH}", json={**BODY, "sync_mode": True})
    assert answer.status_code == 200
    url = answer.json()["images"][0]["url"]
    assert url.startswith("data:image/png;base64,") and len(url) > 1000
    row = app.state.services.store.get(answer.headers["x-fal-request-id"])
    assert row.status == "COMPLETED" and len(json.dumps(row.result)) < 1000
    assert row.result["images"][0]["url"] == "data:image/png;base64,(returned to the caller)"


def test_a_running_request_is_cancelled_at_its_next_step(fake_server):
    editor = FakeEditor(step_s=0.05)
    client, _ = fake_server(editor)
    handle = client.post("/queue/fal-ai/flux-2/edit", json={**BODY, "num_inference_steps": 50}).json()
    wait_status(client, handle, "IN_PROGRESS")
    assert client.put(handle["cancel_url"]).status_code == 202
    done = wait_status(client, handle, "COMPLETED")
    assert done["error_type"] == "request_cancelled"
    assert client.get(handle["response_url"]).status_code == 400


@pytest.mark.parametrize("mode", ["sync", "queue"])
def test_out_of_memory_fails_that_request_on_both_paths(fake_server, mode):
    client, _ = fake_server(FakeEditor(fail_with=torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")))
    if mode == "sync":
        answer = client.post(f"/{FLASH}", json=BODY)
    else:
        handle = client.post(f"/queue/{FLASH}", json=BODY).json()
        assert wait_status(client, handle, "COMPLETED")["error_type"] == "out_of_memory"
        answer = client.get(handle["response_url"])
    assert answer.status_code == 500 and answer.headers["x-fal-retryable"] == "true"  # the memory was released
    assert answer.json()["detail"].startswith("Inference failed: CUDA out of memory (fake)")


def test_a_job_past_its_time_limit_stops_at_its_next_step(fake_server):
    client, _ = fake_server(FakeEditor(step_s=0.05), job_timeout_s=0.2)
    answer = client.post("/fal-ai/flux-2/edit", json={**BODY, "num_inference_steps": 50})
    assert answer.status_code == 504 and "time limit of 0.2 s" in answer.json()["detail"]
    assert answer.headers["x-fal-retryable"] == "false"  # the same request would run as long again


def test_status_carries_structured_progress(fake_server):
    client, _ = fake_server(FakeEditor(step_s=0.05))
    handle = client.post(f"/queue/{TURBO}", json=BODY).json()
    running = wait_status(client, handle, "IN_PROGRESS")
    deadline = time.monotonic() + 30
    while not running.get("progress"):
        assert time.monotonic() < deadline, running
        running = client.get(handle["status_url"]).json()
    assert running["progress"]["total"] == 8 and 1 <= running["progress"]["step"] <= 8
    assert wait_status(client, handle, "COMPLETED")["progress"] == {"step": 8, "total": 8}


def test_an_upload_begun_on_one_front_end_is_finished_on_another(fake_server, tmp_path):
    """The pending upload lives in the queue backend (here one SQLite file that two apps share)."""
    first, _ = fake_server(FakeEditor())
    second, _ = fake_server(FakeEditor())
    target = first.post("/storage/upload/initiate-multipart", json={"content_type": "image/png"}).json()
    upload_path = target["upload_url"].removeprefix("http://testserver")
    assert first.put(f"{upload_path}/1", content=b"\x89PNG part one ").status_code == 200
    assert second.put(f"{upload_path}/2", content=b"part two").status_code == 200
    parts = [{"partNumber": 1, "etag": "a"}, {"partNumber": 2, "etag": "b"}]
    assert second.post(f"{upload_path}/complete", json={"parts": parts}).status_code == 200
    name = target["file_url"].rpartition("/")[2]
    assert (tmp_path / "data" / "files" / name).read_bytes() == b"\x89PNG part one part two"


def test_flash_and_turbo_say_they_ignored_the_base_endpoints_fields(fake_server):
    """fal accepts num_inference_steps and acceleration on flash/turbo and ignores them: so do we, and say so."""
    editor = FakeEditor()
    client, _ = fake_server(editor)
    flash = client.post(f"/{FLASH}", json={**BODY, "num_inference_steps": 40}).json()
    assert "The flash profile runs a fixed schedule: num_inference_steps was ignored." in flash["notices"]
    assert editor.calls[-1].num_inference_steps is None  # the profile's own schedule ran
    handle = client.post(f"/queue/{TURBO}", json={**BODY, "num_inference_steps": 12, "acceleration": "high"}).json()
    wait_status(client, handle, "COMPLETED")
    turbo = client.get(handle["response_url"]).json()  # through the queue row: still noticed
    assert (
        "The turbo profile runs a fixed schedule: num_inference_steps and acceleration were ignored."
        in (turbo["notices"])
    )
    assert editor.calls[-1].acceleration == "none"
    plain = client.post(f"/{FLASH}", json=BODY).json()
    assert not any("ignored" in notice for notice in plain["notices"])


def test_a_failed_queue_write_fails_that_request_and_the_dispatcher_goes_on(fake_server, monkeypatch):
    """The disk fills while requests run: recording their outcome fails. Each request is retried, then failed;
    the dispatcher survives and runs the next request, and /ready stays green."""
    import sqlite3

    from server.queue import dispatcher

    monkeypatch.setattr(dispatcher, "RECORD_RETRY_S", 0.01)
    client, app = fake_server(FakeEditor())
    store = app.state.services.store
    real_complete, faults = store.complete, [3]

    def full_disk_complete(*args, **kwargs):
        if faults[0]:
            faults[0] -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return real_complete(*args, **kwargs)

    monkeypatch.setattr(store, "complete", full_disk_complete)
    handle = client.post(f"/queue/{FLASH}", json=BODY).json()
    # 1st run: its result can't be written (re-queued); 2nd: nor (failed); that failure written on a retry
    done = wait_status(client, handle, "COMPLETED")
    assert done["error_type"] == "worker_crashed" and "database or disk is full" in done["error"]
    assert faults == [0]
    after = client.post(f"/queue/{FLASH}", json=BODY).json()
    assert wait_status(client, after, "COMPLETED")["error"] is None
    assert client.get("/ready").status_code == 200 and client.get("/health").json()["dispatcher_error"] is None


def test_health_and_ready_report_a_dead_dispatcher(fake_server, monkeypatch):
    class Fatal(BaseException):
        """Anything the dispatcher's loop does not survive."""

    client, app = fake_server(FakeEditor())
    store = app.state.services.store

    async def fatal(*args):
        raise Fatal("injected by the test")

    monkeypatch.setattr(store, "wait_for_work", fatal)
    app.state.services.dispatcher.notify()
    deadline = time.monotonic() + 30
    while (ready := client.get("/ready")).status_code == 200:
        assert time.monotonic() < deadline, "/ready stayed green with the dispatcher dead"
        time.sleep(0.01)
    assert ready.status_code == 503 and "dispatcher stopped" in ready.json()["error"]
    health = client.get("/health")
    assert health.status_code == 503 and "injected by the test" in health.json()["dispatcher_error"]


def test_no_new_requests_or_uploads_below_the_free_space_floor(fake_server):
    import shutil

    client, app = fake_server(FakeEditor())
    data_dir = app.state.services.settings.data_dir
    app.state.services.settings.min_free_disk_bytes = shutil.disk_usage(data_dir).free + 2**30
    for path in (f"/queue/{FLASH}", f"/{FLASH}"):
        refused = client.post(path, json=BODY)
        assert refused.status_code == 507 and "disk space" in refused.json()["detail"], refused.text
    upload = client.post("/storage/upload/initiate", json={"content_type": "image/png"})
    assert upload.status_code == 507
    app.state.services.settings.min_free_disk_bytes = 1  # a tiny floor: served
    assert client.post(f"/{FLASH}", json=BODY).status_code == 200
    target = client.post("/storage/upload/initiate", json={"content_type": "image/png"}).json()
    app.state.services.settings.min_free_disk_bytes = shutil.disk_usage(data_dir).free + 2**30
    assert client.put(target["upload_url"], content=image_bytes()).status_code == 507


class HangingEditor(FakeEditor):
    """Its first call hangs inside a step (a hung device or driver) until `unhang` is set; later calls run."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.unhang = threading.Event()

    def edit(self, call):
        if not self.calls:
            self.calls.append(call)
            self.unhang.wait(60)
            call.on_step(1, 4)
            if call.should_cancel():
                raise Cancelled()
            raise AssertionError("a run the step watchdog gave up on must stop at its next step")
        return super().edit(call)


def test_a_step_past_the_step_timeout_fails_its_job_and_nothing_new_starts_until_it_returns(fake_server):
    editor = HangingEditor()
    client, _ = fake_server(editor, step_timeout_s=0.5, worker_heartbeat_ttl_s=0.3)
    hung = client.post(f"/queue/{FLASH}", json=BODY).json()
    after = client.post(f"/queue/{FLASH}", json={**BODY, "seed": 2}).json()
    done = wait_status(client, hung, "COMPLETED")  # failed by the watchdog, though its step never returned
    assert done["error_type"] == "step_timeout" and "FLUX2_STEP_TIMEOUT_S" in done["error"]
    answer = client.get(hung["response_url"])
    assert answer.status_code == 504 and answer.headers["x-fal-retryable"] == "false"
    deadline = time.monotonic() + 30
    while not (worker := client.get("/health").json()["workers"][0])["out_of_rotation"]:
        assert time.monotonic() < deadline, worker
        time.sleep(0.05)
    assert "has not returned" in worker["out_of_rotation"]["reason"]
    time.sleep(0.3)
    assert client.get(after["status_url"]).json()["status"] == "IN_QUEUE"  # the model is still busy: not claimed
    editor.unhang.set()  # the step returns: that run stops there, and the next request runs
    assert wait_status(client, after, "COMPLETED")["error"] is None
    assert len(editor.calls) == 2
    assert client.get(hung["status_url"]).json()["error_type"] == "step_timeout"  # recorded once


def test_a_sync_call_past_the_sync_timeout_is_answered_504_and_its_request_cancelled(fake_server):
    editor = FakeEditor(step_s=0.1)
    client, app = fake_server(editor, sync_timeout_s=0.5)
    answer = client.post("/fal-ai/flux-2/edit", json={**BODY, "num_inference_steps": 50})
    assert answer.status_code == 504 and "FLUX2_SYNC_TIMEOUT_S" in answer.json()["detail"]
    row = app.state.services.store.get(answer.headers["x-fal-request-id"])
    deadline = time.monotonic() + 30
    while row.status != "COMPLETED":  # it stops at its next step
        assert time.monotonic() < deadline
        time.sleep(0.02)
        row = app.state.services.store.get(row.id)
    assert row.error_type == "request_cancelled" and row.progress_step < 50


@pytest.fixture
def redis_url(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("needs Debian's redis-server binary")
    process, url = start_redis(tmp_path / "redis")
    yield url
    process.terminate()
    process.wait(timeout=10)


def test_a_broken_worker_goes_out_of_rotation_and_its_requests_run_elsewhere(fake_server, redis_url):
    """Two servers with models on one Redis queue: one whose model fails every job. After two failures in a row
    it takes itself out of rotation (/health says why); the requests it failed run on the other, and succeed."""
    shared = {"queue": redis_url, "breaker_failures": 2, "breaker_cooldown_s": 60, "worker_heartbeat_ttl_s": 0.3}
    broken_client, _ = fake_server(FakeEditor(fail_with=RuntimeError("GPU fell off the bus")), **shared)
    handles = [broken_client.post(f"/queue/{FLASH}", json={**BODY, "seed": i}).json() for i in range(3)]
    deadline = time.monotonic() + 30
    while not (out := [w for w in broken_client.get("/health").json()["workers"] if w["out_of_rotation"]]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert out[0]["out_of_rotation"]["failures"] == 2
    assert "GPU fell off the bus" in out[0]["out_of_rotation"]["reason"]
    good = FakeEditor()
    good_client, _ = fake_server(good, **shared)
    for handle in handles:
        done = wait_status(good_client, handle, "COMPLETED")
        assert done["error"] is None, done
    assert sorted(call.seed for call in good.calls) == [0, 1, 2]
    requeued = [h for h in handles if any("re-queued" in line["message"] for line in logs_of(good_client, h))]
    assert len(requeued) == 2  # the two the broken worker failed: run again, not failed


def logs_of(client: TestClient, handle: dict) -> list[dict]:
    return client.get(handle["status_url"], params={"logs": 1}).json()["logs"]
