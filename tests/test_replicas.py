"""`serve --gpus 0,1 --device cpu`: two replicas (each the tiny model in its own process) taking requests from the
same embedded queue, concurrently, with nothing lost; a replica killed mid-request restarts and its request is
re-queued once and completes."""

import os
import signal
import time

import httpx
import pytest

from benchmarks.loopback import start_server
from tests.conftest import data_uri, image_bytes

pytestmark = pytest.mark.multiprocess  # two model processes: ~30 s to start on 2 busy cores

ENDPOINT = "fal-ai/flux-2/flash/edit"


def body(seed: int) -> dict:
    return {
        "prompt": "a red door",
        "image_urls": [data_uri(image_bytes(64, 64, seed=seed))],
        "image_size": {"width": 512, "height": 512},
        "seed": seed,
    }


@pytest.fixture(scope="module")
def replicas(tiny_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    process, url = start_server(tiny_weights, root / "data", root / "server.log", "--gpus", "0,1", "--device", "cpu")
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client
    process.terminate()
    process.wait(timeout=60)


def submit(client: httpx.Client, seed: int) -> dict:
    response = client.post(f"/queue/{ENDPOINT}", json=body(seed))
    assert response.status_code == 200, response.text
    return response.json()


def wait_all(client: httpx.Client, handles: list[dict], watch=None, timeout: float = 600) -> dict[str, dict]:
    done: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(done) < len(handles) and time.monotonic() < deadline:
        if watch is not None:
            watch()
        for handle in handles:
            if handle["request_id"] not in done:
                status = client.get(handle["status_url"], params={"logs": 1}).json()
                if status["status"] == "COMPLETED":
                    done[handle["request_id"]] = status
        time.sleep(0.05)
    assert len(done) == len(handles), f"{len(handles) - len(done)} request(s) did not complete"
    return done


def test_two_replicas_serve_requests_concurrently_with_nothing_lost(replicas):
    health = replicas.get("/health").json()
    assert [(r["mode"], r["devices"], r["ready"]) for r in health["replicas"]] == [("replica", ["cpu"], True)] * 2
    runs_before = [r["runs"] for r in health["replicas"]]
    handles = [submit(replicas, seed) for seed in range(6)]
    busy_at_once = []
    watch = lambda: busy_at_once.append(sum(r["busy"] for r in replicas.get("/health").json()["replicas"]))
    wait_all(replicas, handles, watch)
    for seed, handle in enumerate(handles):
        result = replicas.get(handle["response_url"]).json()
        assert result["seed"] == seed and result["images"][0]["width"] == 512  # each its own result
    runs = [r["runs"] - before for r, before in zip(replicas.get("/health").json()["replicas"], runs_before)]
    assert sum(runs) == 6 and min(runs) >= 1  # every request ran once, on both replicas
    assert max(busy_at_once) == 2  # the two ran requests at the same time
    metrics = replicas.get("/metrics").text
    assert 'flux2_replica_ready{devices="cpu",replica="0"} 1.0' in metrics
    assert 'flux2_replica_ready{devices="cpu",replica="1"} 1.0' in metrics


def test_a_replica_killed_mid_request_restarts_and_the_request_is_requeued_once(replicas):
    handle = submit(replicas, 100)
    others = [submit(replicas, seed) for seed in (101, 102)]
    killed = []

    def kill_a_busy_replica() -> None:
        if killed:
            return
        for replica in replicas.get("/health").json()["replicas"]:
            if replica["busy"] and replica["ready"]:
                os.kill(replica["pids"][0], signal.SIGKILL)
                killed.append(replica)
                return

    done = wait_all(replicas, [handle, *others], kill_a_busy_replica)
    assert killed, "no replica was seen busy"
    requeued = [
        status for status in done.values() if any("re-queued" in log["message"] for log in status["logs"] or [])
    ]
    assert len(requeued) == 1  # the killed replica's request ran again, once, and completed
    for h in [handle, *others]:
        assert replicas.get(h["response_url"]).status_code == 200
    restarts = [r["restarts"] for r in replicas.get("/health").json()["replicas"]]
    assert sorted(restarts) == [0, 1]
    assert "flux2_replica_restarts_total" in replicas.get("/metrics").text


def test_serve_parallel_context_runs_each_request_across_the_group(tiny_weights, tmp_path):
    process, url = start_server(
        tiny_weights, tmp_path / "data", tmp_path / "server.log", "--gpus", "0,1", "--device", "cpu",
        "--parallel", "context",
    )  # fmt: skip
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            (group,) = client.get("/health").json()["replicas"]
            assert (group["mode"], group["kind"], group["devices"]) == ("context", "ulysses", ["cpu", "cpu"])
            handle = submit(client, 7)
            status = wait_all(client, [handle])[handle["request_id"]]
            steps = [log["message"] for log in status["logs"] if log["message"].startswith("step ")]
            assert steps == [f"step {i}/4" for i in range(1, 5)]  # rank 0's progress, through the queue
            result = client.get(handle["response_url"]).json()
            assert result["seed"] == 7 and result["images"][0]["width"] == 512
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_serve_refuses_a_group_plan_that_cannot_run(tiny_weights, tmp_path):
    with pytest.raises(RuntimeError, match="don't divide 2"):  # the tiny transformer has 2 attention heads
        start_server(
            tiny_weights, tmp_path / "data", tmp_path / "server.log", "--gpus", "0,1,2,3", "--device", "cpu",
            "--parallel", "context", "--no-supervise",
        )  # fmt: skip
