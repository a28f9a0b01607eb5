"""Around the model (server/queue/pipeline.py): the next requests' inputs are fetched while the model runs, and a
request's images are written after the model let go of it. In-process (tests/fake_editor.py for the model, held on
a gate so the tests decide when "the GPU" is done); no timing is asserted."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import PIL.Image
import pytest
from fastapi.testclient import TestClient

from pipelines import Cancelled, EditCall, EditResult
from server.files.outputs import OutputStore
from server.queue.connect import open_queue
from server.queue.pipeline import Prefetcher
from server.service.edit import Prepared
from tests.conftest import data_uri, image_bytes
from tests.fake_editor import FakeEditor

BODY = {"prompt": "p", "image_urls": [data_uri(image_bytes(64, 64))], "image_size": "square", "seed": 1}
FLASH = "fal-ai/flux-2/flash/edit"
EDIT, TURBO = "fal-ai/flux-2/edit", "fal-ai/flux-2/turbo/edit"


@dataclass
class GatedEditor(FakeEditor):
    """Holds each call until `gate` is set (or the call is cancelled), like a GPU busy on it."""

    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)

    def edit(self, call: EditCall) -> EditResult:
        self.entered.set()
        while not self.gate.wait(0.01):
            if call.should_cancel is not None and call.should_cancel():
                raise Cancelled()
        return super().edit(call)


def until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def status(client: TestClient, handle: dict) -> dict:
    return client.get(handle["status_url"]).json()


def ready_ids(app) -> list[str]:
    return [t.request.id for t in app.state.services.dispatcher.prefetcher.held if t.prepared is not None]


def test_prefetched_requests_stay_in_queue_with_honest_positions_then_run_in_order(fake_server):
    editor = GatedEditor()
    client, app = fake_server(editor)
    first = client.post(f"/queue/{FLASH}", json={**BODY, "seed": 1}).json()
    until(editor.entered.is_set)  # the model is busy on the first
    behind = [client.post(f"/queue/{FLASH}", json={**BODY, "seed": seed}).json() for seed in (2, 3, 4)]
    until(lambda: len(ready_ids(app)) == 2)  # prefetch_requests=2: two are fetched and decoded ahead
    assert ready_ids(app) == [behind[0]["request_id"], behind[1]["request_id"]]
    assert status(client, first)["status"] == "IN_PROGRESS"
    for position, handle in enumerate(behind):  # held ahead, still queued for their clients
        current = status(client, handle)
        assert (current["status"], current["queue_position"]) == ("IN_QUEUE", position)
    assert app.state.services.store.queued_count() == 3
    assert client.get("/health").json()["queued"] == 3
    editor.gate.set()
    until(lambda: all(status(client, h)["status"] == "COMPLETED" for h in [first, *behind]))
    assert [call.seed for call in editor.calls] == [1, 2, 3, 4]
    for handle in [first, *behind]:
        result = client.get(handle["response_url"])
        assert result.status_code == 200 and result.json()["images"][0]["width"] == 512
        assert app.state.services.store.get(handle["request_id"]).attempts == 1


def test_a_prefetched_request_cancelled_or_failing_its_inputs_never_reaches_the_model(fake_server):
    editor = GatedEditor()
    client, app = fake_server(editor)
    first = client.post(f"/queue/{FLASH}", json={**BODY, "seed": 1}).json()
    until(editor.entered.is_set)
    cancelled = client.post(f"/queue/{FLASH}", json={**BODY, "seed": 2}).json()
    until(lambda: cancelled["request_id"] in ready_ids(app))
    answer = client.put(cancelled["cancel_url"])
    assert answer.status_code == 202 and answer.json()["status"] == "CANCELLATION_REQUESTED"
    assert status(client, cancelled)["status"] == "COMPLETED"
    assert cancelled["request_id"] not in ready_ids(app)  # let go at once
    assert client.get(cancelled["response_url"]).json()["detail"] == "Request was cancelled"

    # inputs that can't be decoded: its 422 is answered while the model still runs the first
    broken = {**BODY, "seed": 3, "image_urls": [data_uri(b"not an image")]}
    bad = client.post(f"/queue/{FLASH}", json=broken).json()
    until(lambda: status(client, bad)["status"] == "COMPLETED")
    assert status(client, first)["status"] == "IN_PROGRESS"
    refused = client.get(bad["response_url"])
    assert refused.status_code == 422 and refused.json()["detail"][0]["type"] == "image_load_error"
    invalid = client.post(f"/queue/{FLASH}", json={"prompt": "p"}).json()  # no image_urls: fails the schema
    until(lambda: status(client, invalid)["status"] == "COMPLETED")
    assert client.get(invalid["response_url"]).status_code == 422

    editor.gate.set()
    until(lambda: status(client, first)["status"] == "COMPLETED")
    assert [call.seed for call in editor.calls] == [1]  # only the first ever reached the model


def test_a_prefetched_request_past_its_start_deadline_fails_without_running(fake_server):
    editor = GatedEditor()
    client, app = fake_server(editor)
    first = client.post(f"/queue/{FLASH}", json={**BODY, "seed": 1}).json()
    until(editor.entered.is_set)
    late = client.post(f"/queue/{FLASH}", json={**BODY, "seed": 2}, headers={"X-Fal-Request-Timeout": "0.3"}).json()
    until(lambda: late["request_id"] in ready_ids(app))  # fetched ahead while still in time
    time.sleep(0.4)  # its deadline passes while the model is busy
    editor.gate.set()
    until(lambda: status(client, late)["status"] == "COMPLETED")
    assert status(client, late)["error_type"] == "request_timeout"
    assert [call.seed for call in editor.calls] == [1]
    assert status(client, first)["status"] == "COMPLETED"


def test_at_a_stop_prefetched_requests_go_back_to_the_queue(fake_server, tmp_path):
    editor = GatedEditor()
    client, app = fake_server(editor)
    client.post(f"/queue/{FLASH}", json={**BODY, "seed": 1}).json()
    until(editor.entered.is_set)
    behind = [client.post(f"/queue/{FLASH}", json={**BODY, "seed": seed}).json()["request_id"] for seed in (2, 3)]
    until(lambda: len(ready_ids(app)) == 2)
    client.__exit__(None, None, None)  # a graceful stop
    store = open_queue(None, tmp_path / "data", retention_s=60)
    try:
        assert store.requeue_interrupted() == 1  # the running one (SQLite: re-queued at the next start)
        for request_id in behind:
            kept = store.get(request_id)
            assert (kept.status, kept.attempts) == ("IN_QUEUE", 0)
        assert store.queued_count() == 3
        assert [store.claim([FLASH]).id for _ in range(3)][1:] == behind  # claimable again, in order
    finally:
        store.close()


def test_the_model_takes_the_next_request_while_the_last_ones_images_are_written(fake_server, monkeypatch):
    """A request's result is recorded only once its images are written: until then it is IN_PROGRESS (nothing
    half-stored is visible), while the model runs the next."""
    writing = threading.Event()
    real_save = OutputStore.save

    def slow_save(self, images, *args, **kwargs):
        if images[0].getpixel((0, 0))[0] == 1:  # the first request's (seed 1) images
            writing.wait(30)
        return real_save(self, images, *args, **kwargs)

    monkeypatch.setattr(OutputStore, "save", slow_save)
    editor = FakeEditor()
    client, _ = fake_server(editor)
    first = client.post(f"/queue/{FLASH}", json={**BODY, "seed": 1, "num_images": 4}).json()
    second = client.post(f"/queue/{FLASH}", json={**BODY, "seed": 2}).json()
    until(lambda: status(client, second)["status"] == "COMPLETED")
    assert status(client, first)["status"] == "IN_PROGRESS"
    assert client.get(first["response_url"]).status_code == 400  # no result yet
    writing.set()
    until(lambda: status(client, first)["status"] == "COMPLETED")
    images = client.get(first["response_url"]).json()["images"]
    assert len(images) == 4 and all(client.get(image["url"]).status_code == 200 for image in images)
    assert [call.seed for call in editor.calls] == [1, 2]


def test_with_prefetch_and_async_output_off_requests_run_one_after_another(fake_server):
    editor = GatedEditor()
    client, app = fake_server(editor, prefetch_requests=0, output_async=False)
    first = client.post(f"/queue/{FLASH}", json={**BODY, "seed": 1}).json()
    until(editor.entered.is_set)
    second = client.post(f"/queue/{FLASH}", json={**BODY, "seed": 2}).json()
    time.sleep(0.2)
    assert ready_ids(app) == [] and app.state.services.dispatcher.prefetcher.held == []  # nothing held ahead
    editor.gate.set()
    until(lambda: status(client, second)["status"] == "COMPLETED")
    assert status(client, first)["status"] == "COMPLETED"


def fake_prepared(request) -> Prepared:
    image = PIL.Image.new("RGB", (100, 100))
    call = EditCall(images=[image], prompt="p", width=512, height=512)
    return Prepared("flash", None, call, "http://x/", [], 0.0, 0.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("depth, cap, held_ahead", [(2, 1 << 30, 2), (2, 1, 1), (0, 1 << 30, 0)])
def test_one_prefetcher_serves_every_model_loop_within_its_bounds(tmp_path, depth, cap, held_ahead):
    """Two loops (two replicas) both get a request at once, whatever the depth or memory cap; beyond those, it
    holds `depth` requests, fewer once their images reach the cap (here 1 byte: one, then no more)."""
    store = open_queue(None, tmp_path, retention_s=60)
    for n in range(6):
        store.add(f"r{n}", FLASH, "{}", 0, "http://q", "http://f/", None, None)

    async def scenario():
        async def prepare(request, on_message, head_start):
            await asyncio.sleep(0)
            return fake_prepared(request)

        prefetcher = Prefetcher(store, [FLASH, EDIT, TURBO], prepare, depth, cap, asyncio.Event())
        running = asyncio.create_task(prefetcher.run())
        taken = await asyncio.wait_for(asyncio.gather(prefetcher.take(), prefetcher.take()), 10)
        assert all(store.start(ticket.request.id) for ticket in taken)  # the loops start what they take
        for _ in range(50):  # let it fill up
            await asyncio.sleep(0.01)
        ahead = [t.request.id for t in prefetcher.held]
        prefetcher.stop()
        await running
        await prefetcher.close()
        return sorted(t.request.id for t in taken), ahead

    taken, ahead = asyncio.run(scenario())
    assert taken == ["r0", "r1"]
    assert ahead == [f"r{n}" for n in range(2, 2 + held_ahead)]
    assert store.queued_count() == 4 and store.claim([FLASH]).id == "r2"  # released at close
    store.close()


def test_held_requests_run_by_priority_then_arrival_and_their_logs_start_when_they_run(fake_server):
    """Requests held ahead run in the queue's order (a low-priority one held first still runs after normal ones),
    and a request's log begins when it starts, not when its inputs were fetched."""
    editor = GatedEditor()
    client, app = fake_server(editor)
    blocker = client.post(f"/queue/{FLASH}", json={**BODY, "seed": 0}).json()
    until(editor.entered.is_set)
    order = ["low-1", "normal-1", "low-2", "normal-2"]
    handles = {}
    for seed, name in enumerate(order, start=1):
        headers = {"X-Fal-Queue-Priority": name.split("-")[0]}
        handles[name] = client.post(f"/queue/{FLASH}", json={**BODY, "seed": seed}, headers=headers).json()
    until(lambda: len(ready_ids(app)) == 2)  # low-1 and normal-1, held in arrival order
    positions = {name: status(client, handle)["queue_position"] for name, handle in handles.items()}
    assert positions == {"normal-1": 0, "normal-2": 1, "low-1": 2, "low-2": 3}
    assert app.state.services.store.logs(handles["low-1"]["request_id"]) == []  # fetched ahead, not started
    editor.gate.set()
    until(lambda: all(status(client, h)["status"] == "COMPLETED" for h in [blocker, *handles.values()]))
    seeds = {seed: name for seed, name in enumerate(order, start=1)}
    assert [seeds.get(call.seed, "blocker") for call in editor.calls] == [
        "blocker",
        "normal-1",
        "normal-2",
        "low-1",
        "low-2",
    ]
    first_lines = {
        name: client.get(h["status_url"], params={"logs": 1}).json()["logs"][0]["timestamp"]
        for name, h in handles.items()
    }
    assert sorted(first_lines, key=first_lines.get) == ["normal-1", "normal-2", "low-1", "low-2"]
