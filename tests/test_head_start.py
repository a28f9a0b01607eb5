"""A sync request's head start (server/queue/pipeline.py `Prefetcher.head_start`): on an idle server its inputs are
prepared once, from the body the route validated, while the queue stores it; a busy server (or
FLUX2_PREFETCH_REQUESTS=0) takes the old path; a head start never adopted is cancelled and its scratch files
removed. The real app with tests/fake_editor.py for the model: in-process (TestClient), and on loopback (uvicorn)
where a caller must really go away. No timing is asserted: stores and fetches are held on events instead."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import uvicorn

from server.config import Settings
from server.http.app import create_app
from server.queue.connect import open_queue
from server.queue.dispatcher import Dispatcher
from server.queue.pipeline import Prefetcher
from server.schemas import LoRAInput
from server.service import edit as service_edit
from server.service import model as service_model
from server.service.edit import EditService
from tests.conftest import data_uri, free_port, image_bytes
from tests.fake_editor import FakeEditor
from tests.test_pipeline import GatedEditor, fake_prepared, until

BODY = {"prompt": "p", "image_urls": [data_uri(image_bytes(64, 64))], "image_size": "square", "seed": 1}
FLASH = "fal-ai/flux-2/flash/edit"
HELD_S = 10.0  # how long a held store or fetch waits for its event before going on (a failing test, not a hang)


class Counted:
    """Counts the server's calls that matter here: inputs fetched (`load_images`), stored bodies parsed
    (`Dispatcher._body`), preparations (`EditService.prepare`, each given a scratch file as a LoRA download would
    be); and can hold the fetch (`fetch_gate`) until the test lets it go."""

    def __init__(self, monkeypatch, scratch_dir):
        self.fetches = 0
        self.parses = 0
        self.prepares = 0
        self.fetching = threading.Event()  # a fetch has begun
        self.fetch_gate = threading.Event()
        self.fetch_gate.set()
        self.prepared = threading.Event()  # a preparation has ended
        self.scratch: list = []
        real_load, real_body, real_prepare = service_edit.load_images, Dispatcher._body, EditService.prepare

        async def load_images(*args, **kwargs):
            self.fetches += 1
            self.fetching.set()
            while not self.fetch_gate.is_set():
                await service_edit.asyncio.sleep(0.01)
            return await real_load(*args, **kwargs)

        def body(dispatcher, request):
            self.parses += 1
            return real_body(dispatcher, request)

        async def prepare(service, *args, **kwargs):
            self.prepares += 1
            prepared = await real_prepare(service, *args, **kwargs)
            scratch_dir.mkdir(parents=True, exist_ok=True)
            file = scratch_dir / f"lora-{self.prepares}.safetensors"
            file.write_bytes(b"lora")
            prepared.scratch.append(file)
            self.scratch.append(file)
            self.prepared.set()
            return prepared

        monkeypatch.setattr(service_edit, "load_images", load_images)
        monkeypatch.setattr(Dispatcher, "_body", body)
        monkeypatch.setattr(EditService, "prepare", prepare)


def hold_add(store, until_event: threading.Event) -> dict:
    """Make `store.add` wait for `until_event` first; what it saw is returned (`waited`: whether the event came)."""
    real_add = store.add
    seen: dict = {}

    def add(*args, **kwargs):
        seen["waited"] = until_event.wait(HELD_S)
        return real_add(*args, **kwargs)

    store.add = add
    return seen


def test_an_idle_servers_sync_request_is_prepared_once_from_its_body_while_it_is_stored(
    fake_server, monkeypatch, tmp_path
):
    counted = Counted(monkeypatch, tmp_path / "scratch")
    client, app = fake_server(FakeEditor())
    the = app.state.services
    until(the.dispatcher.prefetcher.idle)  # the model loop waits for work
    stored = hold_add(the.store, counted.fetching)  # the insert waits for the fetch to begin: only if concurrent
    answer = client.post(f"/{FLASH}", json=BODY)
    assert answer.status_code == 200, answer.text
    assert stored["waited"]  # the inputs were being fetched while the request was stored
    assert (counted.prepares, counted.fetches, counted.parses) == (1, 1, 0)  # once, from the validated body
    assert not counted.scratch[0].exists()  # it ran: its scratch files removed, as a prefetched request's
    row = the.store.get(answer.headers["x-fal-request-id"])
    assert row.status == "COMPLETED" and row.attempts == 1
    assert the.store.input_of(row.id) == ""  # its body stayed with its caller's wait: the row holds none
    logs = [line["message"] for line in the.store.logs(row.id)]
    assert logs[0] == "flash 512x512, 1 reference(s), seed 1"  # its preparation's line opens its log
    assert the.dispatcher.prefetcher.head_starts == {} and the.dispatcher.prefetcher.held == []


def test_bad_inputs_given_a_head_start_answer_the_same_422_without_the_model(fake_server, monkeypatch, tmp_path):
    counted = Counted(monkeypatch, tmp_path / "scratch")
    editor = FakeEditor()
    client, app = fake_server(editor)
    until(app.state.services.dispatcher.prefetcher.idle)
    broken = {**BODY, "image_urls": [data_uri(b"not an image")]}
    sync = client.post(f"/{FLASH}", json=broken)
    assert counted.fetches == 1 and counted.parses == 0  # it had a head start
    queued = client.post(f"/queue/{FLASH}", json=broken).json()  # the same body through the queue: the old path
    until(lambda: client.get(queued["status_url"]).json()["status"] == "COMPLETED")
    assert counted.parses == 1
    through_queue = client.get(queued["response_url"])
    assert sync.status_code == through_queue.status_code == 422
    assert sync.json() == through_queue.json() and sync.json()["detail"][0]["type"] == "image_load_error"
    assert app.state.services.store.get(sync.headers["x-fal-request-id"]).error_type == "image_load_error"
    assert editor.calls == []


def test_a_busy_worker_and_prefetch_off_take_the_old_path(fake_server, monkeypatch, tmp_path):
    counted = Counted(monkeypatch, tmp_path / "scratch")
    editor = GatedEditor()
    client, app = fake_server(editor)
    prefetcher = app.state.services.dispatcher.prefetcher
    first = client.post(f"/queue/{FLASH}", json=BODY).json()
    until(editor.entered.is_set)  # the model is busy
    with ThreadPoolExecutor(1) as pool:
        try:
            sync = pool.submit(client.post, f"/{FLASH}", json={**BODY, "seed": 2})
            until(lambda: app.state.services.store.queued_count() == 1)
            assert prefetcher.head_starts == {}
            until(lambda: counted.prepares == 2)  # prepared by the prefetcher behind the running model ...
            assert counted.parses == 2  # ... through `_body`, as any queued request (the sync one's: kept in memory)
        finally:
            editor.gate.set()
        assert sync.result().status_code == 200
        assert app.state.services.store.input_of(sync.result().headers["x-fal-request-id"]) == ""
    assert client.get(first["response_url"]).status_code == 200
    assert [call.seed for call in editor.calls] == [1, 2]


def test_with_prefetch_off_an_idle_servers_sync_request_is_prepared_when_claimed(fake_server, monkeypatch, tmp_path):
    counted = Counted(monkeypatch, tmp_path / "scratch")
    client, app = fake_server(FakeEditor(), prefetch_requests=0)
    prefetcher = app.state.services.dispatcher.prefetcher
    until(lambda: prefetcher.waiting_loops == 1)
    assert not prefetcher.idle()  # never, with FLUX2_PREFETCH_REQUESTS=0: strictly serial
    assert client.post(f"/{FLASH}", json=BODY).status_code == 200
    assert (counted.prepares, counted.parses) == (1, 1)  # when claimed (its body kept by its caller's wait)


def test_simultaneous_sync_requests_on_an_idle_server_get_one_head_start(fake_server, monkeypatch, tmp_path):
    """The bound: one head start per idle model loop; the others wait in the queue and are prefetched as usual
    (while head starts are under way, nothing more is prefetched ahead)."""
    counted = Counted(monkeypatch, tmp_path / "scratch")
    counted.fetch_gate.clear()  # fetches wait
    client, app = fake_server(FakeEditor())
    the = app.state.services
    prefetcher = the.dispatcher.prefetcher
    until(prefetcher.idle)
    with ThreadPoolExecutor(3) as pool:
        try:
            calls = [pool.submit(client.post, f"/{FLASH}", json={**BODY, "seed": seed}) for seed in (1, 2, 3)]
            until(lambda: the.store.queued_count() == 3)
            time.sleep(0.2)  # were the bound not kept, more fetches would begin now
            # the head start, and (if another was stored before the head-started one) one prefetched for the loop
            assert counted.fetches <= 2 and len(prefetcher.head_starts) <= 1
        finally:
            counted.fetch_gate.set()
        assert [call.result().status_code for call in calls] == [200, 200, 200]
    assert counted.fetches == 3 and counted.parses == 2  # one from its body; the others from the queue


def test_a_head_start_whose_store_fails_is_let_go_with_its_files(fake_server, monkeypatch, tmp_path):
    counted = Counted(monkeypatch, tmp_path / "scratch")
    client, app = fake_server(FakeEditor())
    the = app.state.services
    until(the.dispatcher.prefetcher.idle)

    def add(*args, **kwargs):
        counted.prepared.wait(HELD_S)  # the preparation is done (its scratch file written) when the store fails
        raise OSError(28, "No space left on device")

    the.store.add = add
    with pytest.raises(OSError):  # answered 500 by the app's handler, raised again by TestClient
        client.post(f"/{FLASH}", json=BODY)
    assert counted.prepares == 1
    until(lambda: not counted.scratch[0].exists())
    assert the.dispatcher.prefetcher.head_starts == {} and the.dispatcher.prefetcher.held == []
    assert the.dispatcher.prefetcher.idle()  # the next request gets one again


@pytest.fixture
def loopback_app(tmp_path, monkeypatch):
    """The real app with a FakeEditor, served by uvicorn on loopback in a thread (a caller that really goes away)."""
    servers = []

    def start(editor, **settings):
        monkeypatch.setattr(service_model, "load_model", lambda *args: editor)
        app = create_app(Settings(data_dir=tmp_path / "data", **settings), tmp_path / "weights")
        port = free_port()
        uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=uv.run, daemon=True)
        thread.start()
        until(lambda: uv.started)
        servers.append((uv, thread))
        return port, app

    yield start
    for uv, thread in servers:
        uv.should_exit = True
        thread.join(timeout=30)


def test_a_caller_gone_before_its_head_start_was_adopted_leaves_nothing_behind(loopback_app, monkeypatch, tmp_path):
    """The caller goes away while its request is still being stored (its inputs prepared already): it is stored,
    then cancelled; its head start is let go and its scratch files removed; the model never sees it."""
    counted = Counted(monkeypatch, tmp_path / "scratch")
    editor = FakeEditor()
    port, app = loopback_app(editor)
    the = app.state.services
    until(lambda: the.model.state.name == "LOADED")
    until(the.dispatcher.prefetcher.idle)
    store_now = threading.Event()
    hold_add(the.store, store_now)
    body = json.dumps(BODY).encode()
    head = (
        f"POST /{FLASH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port)) as caller:
        caller.sendall(head + body)
        assert counted.prepared.wait(HELD_S)  # its inputs are ready; it is not in the queue yet
        (request_id,) = the.dispatcher.prefetcher.head_starts
    store_now.set()  # the caller is gone: now the store takes it
    until(lambda: (row := the.store.get(request_id)) is not None and row.status == "COMPLETED")
    assert the.store.get(request_id).error_type == "request_cancelled"
    until(lambda: not counted.scratch[0].exists())
    assert the.dispatcher.prefetcher.head_starts == {} and the.dispatcher.prefetcher.held == []
    assert editor.calls == [] and counted.prepares == 1 and counted.parses == 0


def test_head_starts_are_one_per_waiting_loop_and_at_a_stop_cancelled_with_their_files_removed(tmp_path):
    """Unit: with two model loops waiting, two head starts (a third is refused); at a stop, the one still preparing
    is cancelled and the one prepared has its scratch files removed."""
    store = open_queue(None, tmp_path, retention_s=60)
    scratch = tmp_path / "lora.safetensors"
    scratch.write_bytes(b"lora")
    never = asyncio.Event()

    async def prepared_one(on_message):
        prepared = fake_prepared(None)
        prepared.scratch.append(scratch)
        return prepared

    async def blocked(on_message):
        await never.wait()

    async def scenario():
        async def prepare(request, on_message, head_start):  # nothing is stored: never called
            raise AssertionError("nothing to reserve")

        prefetcher = Prefetcher(store, [FLASH], prepare, 2, 1 << 30, asyncio.Event())
        running = asyncio.create_task(prefetcher.run())
        loops = [asyncio.create_task(prefetcher.take()) for _ in range(2)]
        while prefetcher.waiting_loops != 2:
            await asyncio.sleep(0.01)
        ready, waiting = prefetcher.head_start("a", prepared_one), prefetcher.head_start("b", blocked)
        assert ready is not None and waiting is not None
        assert prefetcher.head_start("c", prepared_one) is None and not prefetcher.idle()  # one per waiting loop
        await asyncio.wait_for(asyncio.shield(ready.task), 10)
        assert scratch.exists()
        prefetcher.stop()
        await running
        await prefetcher.close()
        assert prefetcher.head_starts == {} and waiting.task.cancelled()
        assert await asyncio.gather(*loops) == [None, None]

    asyncio.run(scenario())
    assert not scratch.exists()
    store.close()


def test_loras_being_downloaded_when_their_request_is_let_go_are_removed(tmp_path, monkeypatch):
    """A preparation cancelled while its LoRAs are written to scratch (a head start let go, a prefetched request
    cancelled) leaves none of them behind: those written, and the one a thread was still writing."""
    from server.service import loras

    second_writing, finish_writing = threading.Event(), threading.Event()
    real_write = loras.write_scratch

    def write_scratch(directory, data):
        if data == b"second":  # the first is written at once; the second waits
            second_writing.set()
            finish_writing.wait(HELD_S)
        return real_write(directory, data)

    async def fetch(http, path, index, limits, local):
        return path.rpartition("/")[2].encode()

    monkeypatch.setattr(loras, "write_scratch", write_scratch)
    monkeypatch.setattr(loras, "fetch", fetch)
    settings = Settings(data_dir=tmp_path / "data")
    scratch = settings.data_dir / loras.SCRATCH_DIR
    entries = [LoRAInput(path="https://example.com/first"), LoRAInput(path="https://example.com/second")]

    async def scenario():
        resolving = asyncio.create_task(loras.resolve_loras(entries, None, None, settings))
        while not (second_writing.is_set() and list(scratch.glob("*.safetensors"))):
            await asyncio.sleep(0.01)
        resolving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await resolving
        finish_writing.set()  # the thread writes the second file now; it is removed once written
        while list(scratch.iterdir()):
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(scenario(), 30))
