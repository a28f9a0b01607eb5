"""The queue API over plain HTTP: shapes, path forms, priorities, SSE, timeouts, and persistence across SIGKILL."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from tests.conftest import data_uri, image_bytes, start_server

REF = data_uri(image_bytes(96, 96))
QUICK = {"prompt": "p", "image_urls": [REF], "image_size": "square", "seed": 1}
SLOW = {"prompt": "p", "image_urls": [REF], "image_size": "square_hd", "num_inference_steps": 40, "seed": 2}


def submit(client: httpx.Client, base: str, endpoint: str, body: dict, **kwargs) -> dict:
    response = client.post(f"{base}/queue/{endpoint}", json=body, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def wait_done(client: httpx.Client, handle: dict, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(handle["status_url"], params={"logs": 1}).json()
        if status["status"] == "COMPLETED":
            return status
        time.sleep(0.05)
    raise AssertionError(f"{handle['request_id']} did not complete")


def test_submit_status_result_shapes(server):
    c = server.client
    handle = submit(c, server.url, "fal-ai/flux-2/turbo/edit", QUICK)
    assert set(handle) == {
        "status",
        "request_id",
        "gateway_request_id",
        "response_url",
        "status_url",
        "cancel_url",
        "queue_position",
    }
    assert handle["status"] == "IN_QUEUE" and handle["gateway_request_id"] == handle["request_id"]
    assert handle["response_url"] == f"{server.url}/queue/fal-ai/flux-2/requests/{handle['request_id']}"
    assert handle["status_url"] == handle["response_url"] + "/status"
    done = wait_done(c, handle)
    assert done["metrics"]["inference_time"] > 0 and done["error"] is None
    steps = [log for log in done["logs"] if log["message"].startswith("step ")]
    assert [log["message"] for log in steps] == [f"step {i}/8" for i in range(1, 9)]
    assert all(log["timestamp"].endswith("+00:00") and log["level"] == "INFO" for log in steps)
    assert c.get(handle["status_url"]).json()["logs"] is None  # logs only when asked for
    assert c.get(handle["status_url"]).status_code == 200  # fal: 202 until COMPLETED, then 200
    result = c.get(handle["response_url"])
    assert result.status_code == 200 and result.headers["x-fal-request-id"] == handle["request_id"]
    assert result.json()["seed"] == 1 and result.json()["images"][0]["width"] == 512
    # the endpoint-path form that fal's clients also build
    other_form = f"{server.url}/queue/fal-ai/flux-2/turbo/edit/requests/{handle['request_id']}"
    assert c.get(other_form).json() == result.json()
    assert c.get(other_form + "/status").json()["status"] == "COMPLETED"


def test_unknown_and_invalid(server):
    c = server.client
    assert c.get(f"{server.url}/queue/fal-ai/flux-2/requests/nope/status").status_code == 404
    assert c.get(f"{server.url}/queue/fal-ai/flux-2/requests/nope").status_code == 404
    assert c.put(f"{server.url}/queue/fal-ai/flux-2/requests/nope/cancel").status_code == 404
    # fal's queue validates when the request runs: an invalid body gets an id, and its result is the 422
    queued = c.post(f"{server.url}/queue/fal-ai/flux-2/edit", json={**QUICK, "num_images": 9})
    assert queued.status_code == 200 and wait_done(c, queued.json())["error_type"] == "validation_error"
    bad = c.get(queued.json()["response_url"])
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "num_images"]
    bad = c.post(f"{server.url}/queue/fal-ai/flux-2/edit", json=QUICK, headers={"X-Fal-Queue-Priority": "urgent"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["header", "x-fal-queue-priority"]


def test_a_failed_request_reports_fal_errors(server):
    c = server.client
    handle = submit(c, server.url, "fal-ai/flux-2/flash/edit", {**QUICK, "image_urls": ["data:image/png;base64,AAAA"]})
    done = wait_done(c, handle)
    assert done["error_type"] == "image_load_error"
    result = c.get(handle["response_url"])
    assert result.status_code == 422 and result.json()["detail"][0]["loc"] == ["body", "image_urls", 0]


def test_priority_then_arrival_order_and_positions(server):
    c = server.client
    blocker = submit(c, server.url, "fal-ai/flux-2/edit", SLOW)
    order = ["low-1", "normal-1", "low-2", "normal-2"]
    handles = {}
    for name in order:
        priority = name.split("-")[0]
        handles[name] = submit(
            c, server.url, "fal-ai/flux-2/flash/edit", QUICK, headers={"X-Fal-Queue-Priority": priority}
        )
    assert c.get(handles["low-2"]["status_url"]).status_code == 202
    positions = {n: c.get(h["status_url"]).json().get("queue_position") for n, h in handles.items()}
    assert positions == {"normal-1": 0, "normal-2": 1, "low-1": 2, "low-2": 3}
    result = c.get(handles["low-2"]["response_url"])
    assert result.status_code == 400 and result.json()["detail"] == "Request is still in progress"
    c.put(blocker["cancel_url"])  # all four are queued: the model may take them now (in priority order)
    started = {}
    for name, handle in handles.items():
        logs = wait_done(c, handle)["logs"]
        started[name] = logs[0]["timestamp"]
    wait_done(c, blocker)
    assert sorted(started, key=started.get) == ["normal-1", "normal-2", "low-1", "low-2"]


def test_status_stream_is_server_sent_events_ending_at_completion(server):
    c = server.client
    handle = submit(c, server.url, "fal-ai/flux-2/turbo/edit", QUICK)
    events = []
    with c.stream("GET", handle["status_url"] + "/stream", params={"logs": 1}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    assert events[-1]["status"] == "COMPLETED"
    assert {e["status"] for e in events} <= {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
    assert sum(log["message"].startswith("step ") for log in events[-1]["logs"]) == 8


def test_queue_host_routing(server):
    c = server.client
    port = server.url.rsplit(":", 1)[1]
    response = c.post(f"{server.url}/fal-ai/flux-2/flash/edit", json=QUICK, headers={"Host": f"queue.localhost:{port}"})
    handle = response.json()
    assert handle["status_url"].startswith(f"http://queue.localhost:{port}/fal-ai/flux-2/requests/")
    status_path = handle["status_url"].split(port, 1)[1]
    status = c.get(server.url + status_path, headers={"Host": f"queue.localhost:{port}"})
    assert status.json()["request_id"] == handle["request_id"]


def test_request_timeout_header_fails_a_request_that_waited_too_long(server):
    c = server.client
    blocker = submit(c, server.url, "fal-ai/flux-2/edit", SLOW)
    late = submit(c, server.url, "fal-ai/flux-2/flash/edit", QUICK, headers={"X-Fal-Request-Timeout": "0.2"})
    done = wait_done(c, late)
    assert done["error_type"] == "request_timeout"
    result = c.get(late["response_url"])
    assert result.status_code == 504 and result.headers["x-fal-request-timeout-type"] == "user"  # as fal marks it
    c.put(blocker["cancel_url"])  # done blocking: the shared server's model is free for the next test sooner
    wait_done(c, blocker)
    # fal's minimum is over 0.1 s
    too_short = {"X-Fal-Request-Timeout": "0.1"}
    refused = c.post(f"{server.url}/queue/fal-ai/flux-2/flash/edit", json=QUICK, headers=too_short)
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["header", "x-fal-request-timeout"]


def test_cancel(server):
    c = server.client
    running = submit(c, server.url, "fal-ai/flux-2/edit", SLOW)
    queued = submit(c, server.url, "fal-ai/flux-2/flash/edit", QUICK)
    while c.get(running["status_url"]).json()["status"] != "IN_PROGRESS":
        time.sleep(0.02)
    assert c.put(queued["cancel_url"]).status_code == 202
    assert c.get(queued["status_url"]).json()["error_type"] == "request_cancelled"  # at once
    cancel = c.put(running["cancel_url"])
    assert cancel.status_code == 202 and cancel.json() == {"status": "CANCELLATION_REQUESTED"}
    done = wait_done(c, running)
    assert done["error_type"] == "request_cancelled"
    assert sum(log["message"].startswith("step ") for log in done["logs"]) < 40
    assert c.put(running["cancel_url"]).json() == {"status": "ALREADY_COMPLETED"}
    # the model is free again
    assert wait_done(c, submit(c, server.url, "fal-ai/flux-2/flash/edit", QUICK))["error"] is None


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_nothing_accepted_is_lost_when_the_server_stops(tiny_weights, tmp_path, stop):
    data, log = tmp_path / "data", tmp_path / "server.log"
    process, url = start_server(tiny_weights, data, log)
    with httpx.Client(timeout=60) as c:
        running = submit(c, url, "fal-ai/flux-2/edit", {**SLOW, "num_inference_steps": 50})
        queued = [submit(c, url, "fal-ai/flux-2/flash/edit", {**QUICK, "seed": i}) for i in range(3)]
        while c.get(running["status_url"]).json()["status"] != "IN_PROGRESS":
            time.sleep(0.02)
    process.send_signal(stop)
    process.wait(timeout=60)

    process, url = start_server(tiny_weights, data, tmp_path / "restarted.log")
    try:
        with httpx.Client(timeout=60) as c:
            for handle in [running, *queued]:
                request_id = handle["request_id"]
                done = wait_done(c, {**handle, "status_url": f"{url}/queue/fal-ai/flux-2/requests/{request_id}/status"})
                assert done["error"] is None, done
                assert c.get(f"{url}/queue/fal-ai/flux-2/requests/{request_id}").status_code == 200
        assert "re-queued 1 request(s)" in (tmp_path / "restarted.log").read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_retention_removes_old_requests_and_their_files(tiny_weights, tmp_path):
    data = tmp_path / "data"
    env = {"FLUX2_RETENTION_S": "2", "FLUX2_RETENTION_SWEEP_EVERY_S": "0.2"}
    process, url = start_server(tiny_weights, data, tmp_path / "log", env=env)
    try:
        with httpx.Client(timeout=60) as c:
            handle = submit(c, url, "fal-ai/flux-2/flash/edit", QUICK)
            wait_done(c, handle)
            file_url = c.get(handle["response_url"]).json()["images"][0]["url"]
            assert c.get(file_url).status_code == 200
            deadline = time.monotonic() + 30
            while c.get(handle["response_url"]).status_code != 404:
                assert time.monotonic() < deadline, "not cleaned up"
                time.sleep(0.2)
            assert c.get(file_url).status_code == 404
            assert not list((data / "files").glob("*.png"))
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_twenty_requests_at_once_all_complete_in_priority_then_arrival_order(server):
    c = server.client
    blocker = submit(c, server.url, "fal-ai/flux-2/edit", SLOW)
    names = [f"{'low' if i % 3 == 0 else 'normal'}-{i:02d}" for i in range(20)]
    handles = {
        name: submit(
            c,
            server.url,
            "fal-ai/flux-2/flash/edit",
            {**QUICK, "seed": i},
            headers={"X-Fal-Queue-Priority": name.split("-")[0]},
        )
        for i, name in enumerate(names)
    }
    c.put(blocker["cancel_url"])  # all twenty are queued: the model may take them now (in priority order)
    started = {name: wait_done(c, handle)["logs"][0]["timestamp"] for name, handle in handles.items()}
    wait_done(c, blocker)
    expected = sorted(names, key=lambda n: (n.startswith("low"), n))  # normal first, then by arrival
    assert sorted(names, key=started.get) == expected
    results = [c.get(h["response_url"]) for h in handles.values()]
    assert all(r.status_code == 200 for r in results)
    assert len({r.json()["images"][0]["url"] for r in results}) == 20


def test_sqlite_keeps_inputs_apart_from_the_rows_status_reads(tmp_path):
    import sqlite3

    from server.queue.sqlite_queue import RequestStore

    store = RequestStore(tmp_path / "queue.db")
    store.add("r", "fal-ai/flux-2/flash/edit", '{"prompt": "' + "x" * 100_000 + '"}', 0, "q", "f", None, None)
    db = sqlite3.connect(tmp_path / "queue.db")
    assert db.execute("SELECT LENGTH(input) FROM requests WHERE id='r'").fetchone() == (0,)
    assert db.execute("SELECT LENGTH(input) FROM inputs WHERE id='r'").fetchone()[0] > 100_000
    # a queue written before inputs were kept apart: its queued rows still run with their input
    db.execute(
        "INSERT INTO requests (id, endpoint_id, input, priority, status, queue_url, files_url, created_at)"
        " VALUES ('old', 'fal-ai/flux-2/flash/edit', ?, 1, 'IN_QUEUE', 'q', 'f', 0)",
        ('{"prompt": "old"}',),
    )
    db.commit()
    assert store.claim(["fal-ai/flux-2/flash/edit"]).input.startswith('{"prompt": "xxx')
    assert store.claim(["fal-ai/flux-2/flash/edit"]).input == '{"prompt": "old"}'
    store.delete(["r"])
    assert db.execute("SELECT COUNT(*) FROM inputs").fetchone() == (0,)
    db.close()
    store.close()


def test_sqlite_syncs_queued_submits_to_disk_but_not_sync_requests(tmp_path):
    """An answered queued submit survives a power cut (its insert is committed with synchronous=FULL: fsync); a sync
    request's row does not wait on the disk: after a crash nobody awaits it and it is refused, not run."""
    from server.queue.backend import SYNC
    from server.queue.sqlite_queue import RequestStore

    store = RequestStore(tmp_path / "queue.db")
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    store.add("queued", "fal-ai/flux-2/flash/edit", "{}", 0, "http://q/", "f", None, None)
    assert "PRAGMA synchronous=FULL" in statements and statements[-1] == "PRAGMA synchronous=NORMAL"
    statements.clear()
    store.add("sync", "fal-ai/flux-2/flash/edit", "{}", 0, SYNC, "f", None, None)
    assert not any(statement.startswith("PRAGMA") for statement in statements)
    assert any(statement.startswith("INSERT INTO requests") for statement in statements)
    assert store.get("sync").queue_url == SYNC and store.input_of("sync") == "{}"
    store.close()


def test_sqlite_queue_written_before_owners_keeps_working(tmp_path):
    """A queue database from before owners were recorded gains the column; its rows have no owner (any key sees
    them, as before) and run."""
    import sqlite3

    from server.queue.sqlite_queue import RequestStore

    db = sqlite3.connect(tmp_path / "queue.db")
    db.executescript(
        "CREATE TABLE requests (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, endpoint_id TEXT NOT"
        " NULL, input TEXT NOT NULL, priority INTEGER NOT NULL, status TEXT NOT NULL, queue_url TEXT NOT NULL,"
        " files_url TEXT NOT NULL, webhook_url TEXT, start_deadline REAL, created_at REAL NOT NULL, started_at REAL,"
        " completed_at REAL, status_code INTEGER, result TEXT, error TEXT, error_type TEXT, metrics TEXT,"
        " attempts INTEGER NOT NULL DEFAULT 0, progress_step INTEGER, progress_total INTEGER);"
        "INSERT INTO requests (id, endpoint_id, input, priority, status, queue_url, files_url, created_at)"
        " VALUES ('old', 'fal-ai/flux-2/flash/edit', '{\"prompt\": \"old\"}', 0, 'IN_QUEUE', 'q', 'f', 0);"
    )
    db.close()
    store = RequestStore(tmp_path / "queue.db")
    assert store.get("old").owner is None
    store.add("new", "fal-ai/flux-2/flash/edit", "{}", 0, "q", "f", None, None, owner="cd" * 32)
    assert store.get("new").owner == "cd" * 32
    assert store.claim(["fal-ai/flux-2/flash/edit"]).input == '{"prompt": "old"}'
    store.close()


def held_after_denoising():
    """A FakeEditor that, every denoising step done, holds (as decoding and encoding would) until released."""
    import threading
    from dataclasses import dataclass, field

    from tests.fake_editor import FakeEditor

    @dataclass
    class Held(FakeEditor):
        denoised: threading.Event = field(default_factory=threading.Event)
        release: threading.Event = field(default_factory=threading.Event)

        def edit(self, call):
            result = super().edit(call)
            self.denoised.set()
            assert self.release.wait(30)
            return result

    return Held()


def test_a_cancel_after_the_last_step_is_already_completed(fake_server):
    """Too late to stop (every step done): fal's ALREADY_COMPLETED, and the request completes as it is, rather than
    a 202 followed by a result."""
    client, _ = fake_server(editor := held_after_denoising())
    handle = submit(client, "", "fal-ai/flux-2/flash/edit", QUICK)
    assert editor.denoised.wait(30)
    assert client.get(handle["status_url"]).json()["progress"] == {"step": 4, "total": 4}
    cancel = client.put(handle["cancel_url"])
    assert (cancel.status_code, cancel.json()) == (400, {"status": "ALREADY_COMPLETED"})
    editor.release.set()
    assert wait_done(client, handle, timeout=30)["error"] is None
    assert client.get(handle["response_url"]).status_code == 200


def test_a_cancel_accepted_as_the_last_step_ends_is_honoured(fake_server):
    """A cancel that was answered 202 just before the last step's progress was recorded (the flag set after that
    step's check) still ends the request cancelled: a 202 is never followed by a result."""
    client, app = fake_server(editor := held_after_denoising())
    handle = submit(client, "", "fal-ai/flux-2/flash/edit", QUICK)
    assert editor.denoised.wait(30)
    app.state.services.store.request_cancel(handle["request_id"])  # what the cancel route did, a moment late
    editor.release.set()
    assert wait_done(client, handle, timeout=30)["error_type"] == "request_cancelled"
