"""GPU and worker faults, injected through the real code path on the CPU: CUDA out-of-memory, a job past its time
limit, the worker failing on a request (re-queued once), the dispatcher loop failing, and a request that kills
the whole process on every start (failed after two, across restarts)."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
import weakref
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from diffusers import Flux2Transformer2DModel

from server.config import Settings
from server.http.app import create_app
from server.service.edit import EditService
from tests.conftest import data_uri, free_port, image_bytes, start_server

GOOD = {"prompt": "p", "image_urls": [data_uri(image_bytes(96, 96))], "image_size": "square", "seed": 1}
SLOW = {**GOOD, "image_size": "square_hd", "num_inference_steps": 50}


@pytest.fixture
def start_app(tiny_weights, tmp_path):
    """Start the app in this process (uvicorn on loopback, in a thread), so a test can reach into the model."""
    servers = []

    def start(**settings):
        app = create_app(Settings(data_dir=tmp_path / "data", **settings), tiny_weights, tiny=True)
        port = free_port()
        uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=uv.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        while not uv.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        servers.append((uv, thread))
        return f"http://127.0.0.1:{port}", app

    yield start
    for uv, thread in servers:
        uv.should_exit = True
        thread.join(timeout=60)


def wait_done(client: httpx.Client, handle: dict, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(handle["status_url"], params={"logs": 1}).json()
        if status["status"] == "COMPLETED":
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def test_cuda_out_of_memory_fails_that_request_frees_memory_and_the_next_succeeds(start_app, monkeypatch):
    url, _ = start_app()
    real_forward = Flux2Transformer2DModel.forward
    faults = [2]  # the next two transformer calls run out of memory
    held = []  # weak references to the tensors the failed jobs had
    emptied = []

    def forward(self, hidden_states, *args, **kwargs):
        if faults[0]:
            faults[0] -= 1
            held.append(weakref.ref(hidden_states))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test)")
        return real_forward(self, hidden_states, *args, **kwargs)

    real_empty_cache = torch.cuda.empty_cache
    monkeypatch.setattr(Flux2Transformer2DModel, "forward", forward)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: (emptied.append(1), real_empty_cache()))
    with httpx.Client(base_url=url, timeout=120) as client:
        failed = client.post("/fal-ai/flux-2/flash/edit", json=GOOD)
        assert failed.status_code == 500
        detail = failed.json()["detail"]
        assert "CUDA out of memory. Tried to allocate 20.00 GiB" in detail and "released" in detail
        assert emptied
        gc.collect()
        assert held[0]() is None  # nothing keeps the failed job's tensors alive

        queued = client.post("/queue/fal-ai/flux-2/flash/edit", json=GOOD).json()
        done = wait_done(client, queued)
        assert done["error_type"] == "out_of_memory" and "CUDA out of memory" in done["error"]
        assert client.get(queued["response_url"]).status_code == 500

        ok = client.post("/fal-ai/flux-2/flash/edit", json=GOOD)
        assert ok.status_code == 200, ok.text
        assert client.get("/health").json()["waiting"] == 0


def test_a_job_past_its_time_limit_is_stopped_and_failed(start_app, monkeypatch):
    url, app = start_app(job_timeout_s=2.0)
    real_forward = Flux2Transformer2DModel.forward
    slow = [True]

    def forward(self, *args, **kwargs):
        if slow[0]:
            time.sleep(0.3)  # a slow device: 50 steps take 15 s
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(Flux2Transformer2DModel, "forward", forward)
    with httpx.Client(base_url=url, timeout=120) as client:
        started = time.monotonic()
        failed = client.post("/fal-ai/flux-2/edit", json=SLOW)
        assert failed.status_code == 504
        assert "time limit of 2 s" in failed.json()["detail"] and "stopped after step" in failed.json()["detail"]
        assert time.monotonic() - started < 12

        queued = client.post("/queue/fal-ai/flux-2/edit", json=SLOW).json()
        done = wait_done(client, queued)
        assert done["error_type"] == "job_timeout"
        steps = [log for log in done["logs"] if log["message"].startswith("step ")]
        assert 1 <= len(steps) < 50
        assert client.get(queued["response_url"]).status_code == 504

        slow[0] = False
        app.state.services.model.runner.job_timeout_s = (
            None  # this busy test machine may take more than 2 s for any job
        )
        assert client.post("/fal-ai/flux-2/flash/edit", json=GOOD).status_code == 200


def test_worker_failure_requeues_the_request_once(start_app, monkeypatch):
    url, app = start_app()
    real_edit = EditService.edit
    calls = []
    failures = [1]

    async def crashing_edit(*args, **kwargs):
        calls.append(1)
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError("the worker died (injected by the test)")
        return await real_edit(*args, **kwargs)

    monkeypatch.setattr(EditService, "edit", crashing_edit)
    with httpx.Client(base_url=url, timeout=120) as client:
        handle = client.post("/queue/fal-ai/flux-2/flash/edit", json=GOOD).json()
        done = wait_done(client, handle)
        assert done["error"] is None and len(calls) == 2
        assert any("re-queued" in log["message"] for log in done["logs"])
        assert app.state.services.store.get(handle["request_id"]).attempts == 2

        # a request the worker fails on every time is failed after its second start, not retried forever
        calls.clear()
        failures[0] = 10
        poison = client.post("/queue/fal-ai/flux-2/flash/edit", json=GOOD).json()
        done = wait_done(client, poison)
        assert done["error_type"] == "worker_crashed" and "2 times" in done["error"] and len(calls) == 2
        assert client.get(poison["response_url"]).status_code == 500
        failures[0] = 0
        after = client.post("/queue/fal-ai/flux-2/flash/edit", json=GOOD).json()
        assert wait_done(client, after)["error"] is None


def test_the_dispatcher_loop_restarts_after_a_fault(start_app, monkeypatch):
    url, app = start_app()
    store = app.state.services.store
    real_claim = store.claim
    faults = [1]

    def failing_claim(*args):
        if faults[0]:
            faults[0] -= 1
            raise RuntimeError("queue store failure (injected by the test)")
        return real_claim(*args)

    monkeypatch.setattr(store, "claim", failing_claim)
    with httpx.Client(base_url=url, timeout=120) as client:
        handle = client.post("/queue/fal-ai/flux-2/flash/edit", json=GOOD).json()
        assert wait_done(client, handle)["error"] is None
        assert faults == [0]


def test_a_request_that_kills_the_process_is_failed_after_two_starts(tiny_weights, tmp_path):
    """SIGKILL stands in for a crash that takes the process down (segfault, OOM killer) whenever this request
    runs: the first restart runs it again, the second fails it instead of dying with it forever."""
    data = tmp_path / "data"
    handle = None
    for attempt in range(2):
        process, url = start_server(tiny_weights, data, tmp_path / f"run{attempt}.log")
        with httpx.Client(base_url=url, timeout=60) as client:
            if handle is None:
                handle = client.post("/queue/fal-ai/flux-2/edit", json=SLOW).json()
            status_path = f"/queue/fal-ai/flux-2/requests/{handle['request_id']}/status"
            deadline = time.monotonic() + 120
            while client.get(status_path).json()["status"] != "IN_PROGRESS":
                assert time.monotonic() < deadline
                time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)

    process, url = start_server(tiny_weights, data, tmp_path / "run2.log")
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            status = client.get(f"/queue/fal-ai/flux-2/requests/{handle['request_id']}/status").json()
            assert status["status"] == "COMPLETED" and status["error_type"] == "worker_crashed"
            assert "2 times" in status["error"]
            assert client.get(f"/queue/fal-ai/flux-2/requests/{handle['request_id']}").status_code == 500
            quick = client.post("/queue/fal-ai/flux-2/flash/edit", json=GOOD).json()
            assert (
                wait_done(client, {**quick, "status_url": url + quick["status_url"].split(url, 1)[1]})["error"] is None
            )
    finally:
        process.terminate()
        process.wait(timeout=30)


def supervised_child(supervisor_pid: int) -> int:
    children = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_the_supervisor_restarts_a_crashed_server_and_the_running_request_finishes(tiny_weights, tmp_path):
    """`serve` runs the server in a child process; SIGKILL on it (a segfault or the OOM killer, say) mid-job: the
    supervisor starts a new one, which re-queues the request once and finishes it. SIGTERM on the supervisor then
    stops both."""
    process, url = start_server(tiny_weights, tmp_path / "data", tmp_path / "server.log")
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            handle = client.post("/queue/fal-ai/flux-2/edit", json=SLOW).json()
            while client.get(handle["status_url"]).json()["status"] != "IN_PROGRESS":
                time.sleep(0.02)
            crashed = supervised_child(process.pid)
            os.kill(crashed, signal.SIGKILL)
            deadline = time.monotonic() + 300
            while True:  # the port is closed while the new process loads the model
                try:
                    done = client.get(handle["status_url"], params={"logs": 1}).json()
                except httpx.TransportError:
                    done = {"status": "restarting"}
                if done["status"] == "COMPLETED":
                    break
                assert time.monotonic() < deadline, done
                time.sleep(0.1)
            assert done["error"] is None, done
            assert any("re-queued" in line["message"] for line in done["logs"]), done["logs"]
            assert client.get(handle["response_url"]).status_code == 200
            assert supervised_child(process.pid) != crashed and process.poll() is None
            assert "starting it again" in (tmp_path / "server.log").read_text()
            assert client.get("/health").json()["restarts"] == 1
        child = supervised_child(process.pid)
        process.terminate()
        assert process.wait(timeout=60) == -signal.SIGTERM  # as uvicorn ends after a graceful stop
        assert not Path(f"/proc/{child}").exists()
    finally:
        if process.poll() is None:
            process.kill()


def test_a_killed_supervisor_takes_its_server_with_it(tiny_weights, tmp_path):
    process, _url = start_server(tiny_weights, tmp_path / "data", tmp_path / "server.log")
    child = supervised_child(process.pid)
    process.kill()
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child}").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, "the server process outlived its supervisor"
        time.sleep(0.05)


def test_the_supervisor_backs_off_instead_of_giving_up(monkeypatch):
    """Eight deaths in a row (a crash loop, a memory blow-up): each next start waits longer, none is the last; the
    child is told how often it was started again (/health's `restarts`)."""
    from server.cli import supervisor
    from server.config import RESTARTS_ENV

    statuses = iter([-signal.SIGKILL] * 8 + [0])
    started: list[str] = []

    class Child:
        pid = 4242

        def __init__(self, command, env, **options):
            started.append(env[RESTARTS_ENV])
            self.status = next(statuses)

        def wait(self):
            return self.status

        def poll(self):
            return self.status

    slept: list[float] = []
    monkeypatch.setattr(supervisor.subprocess, "Popen", Child)
    monkeypatch.setattr(supervisor.time, "sleep", slept.append)
    monkeypatch.setattr(supervisor.signal, "signal", lambda *args: None)  # the test process keeps its handlers
    assert supervisor.supervise(["serve"], "text") == 0
    assert started == [str(n) for n in range(9)]
    delays = [supervisor.restart_delay(n) for n in range(1, 9)]
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128] and supervisor.restart_delay(50) == supervisor.MAX_RESTART_DELAY_S
    assert sum(slept) == pytest.approx(sum(delays))
