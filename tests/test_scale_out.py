"""Scale-out over a real redis-server on loopback: API front-ends (`serve --queue`, no model) and GPU workers
(`worker --queue`, the tiny model here) as separate processes sharing one Redis and one S3-compatible bucket
(moto's server on loopback)."""

from __future__ import annotations

import json
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import httpx
import pytest
import redis
from moto.server import ThreadedMotoServer

from benchmarks.loopback import free_port, start_redis, start_server, start_worker
from tests.conftest import data_uri, decode, image_bytes

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs Debian's redis-server binary")

REF = data_uri(image_bytes(96, 96))
QUICK = {"prompt": "p", "image_urls": [REF], "image_size": "square", "seed": 1}
# long enough (1024², 50 steps) that the test's own calls fit well inside it on a loaded machine; it is cancelled
SLOW = {"prompt": "p", "image_urls": [REF], "image_size": "square_hd", "num_inference_steps": 50, "seed": 2}
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# Workers fetch inputs uploaded to another front-end over HTTP: on loopback here, so allowed past the SSRF guard
# (a deployment allow-lists its front-ends' network, or gives them one FLUX2_PUBLIC_URL; see SECURITY.md).
ENV = {
    "FLUX2_QUEUE_VISIBILITY_TIMEOUT_S": "3",
    "FLUX2_WORKER_HEARTBEAT_TTL_S": "2",
    "FLUX2_FETCH_ALLOW": "127.0.0.1/32",
    "FLUX2_QUEUE_RETRY_MAX_S": "1",  # Redis down: try again at least every second (30 s by default)
    "FLUX2_QUEUE_TIMEOUT_S": "2",
    **AWS,
}


@dataclass
class Cluster:
    root: Path
    weights: Path
    redis_url: str
    redis: redis.Redis
    shared: Path  # each process's data directory (nothing shared through it: files go to the bucket)
    storage: str  # s3://... with presigned URLs
    bucket: object
    redis_process: object = None  # with the README's AOF settings: stopped and started again by the outage test
    fronts: list = field(default_factory=list)  # [(process, url)]
    workers: list = field(default_factory=list)  # processes
    logs: list = field(default_factory=list)

    def start_front(self, name: str, urls: str = "presigned"):
        log = self.root / f"{name}.log"
        self.logs.append(log)
        env = {**ENV, "FLUX2_STORAGE": f"{self.storage}&urls={urls}"}
        front = start_server(None, self.root / name, log, "--queue", self.redis_url, env=env)
        self.fronts.append(front)
        return front

    def start_worker(self, name: str, *extra: str, queue_from_env: bool = False):
        log = self.root / f"{name}.log"
        self.logs.append(log)
        # unsupervised: a worker killed here stands for a machine gone for good (its pid is the worker's own);
        # a supervised worker's restart is tested in test_faults.py
        env = {**ENV, "FLUX2_STORAGE": self.storage, "FLUX2_SUPERVISE": "0"}
        queue = self.redis_url
        if queue_from_env:  # FLUX2_QUEUE alone, as a URL with a password is given (out of `ps`)
            env, queue = {**env, "FLUX2_QUEUE": self.redis_url}, None
        worker = start_worker(self.weights, queue, self.root / name, log, *extra, env=env)
        self.workers.append(worker)
        return worker

    def worker_logs(self) -> str:
        return "".join(p.read_text() for p in self.logs if p.name.startswith("worker"))

    def live_workers(self, url: str) -> list[dict]:
        return httpx.get(f"{url}/health").json()["workers"]


@pytest.fixture(scope="module")
def cluster(tiny_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    redis_process, url = start_redis(root / "redis", appendonly=True)
    s3_port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    s3.start()
    endpoint = f"http://127.0.0.1:{s3_port}"
    bucket = boto3.resource("s3", endpoint_url=endpoint, region_name="us-east-1", **_keys()).Bucket("flux2")
    bucket.create()
    storage = f"s3://flux2/outputs?endpoint_url={endpoint}&region=us-east-1"
    c = Cluster(root, tiny_weights, url, redis.Redis.from_url(url, decode_responses=True), root, storage, bucket)
    c.redis_process = redis_process
    try:
        c.start_front("front-a")
        c.start_front("front-b", urls="proxy")  # streams bucket files under its /files/
        c.start_worker("worker-1")
        c.start_worker("worker-2", "--profiles", "turbo,flash", queue_from_env=True)  # a smaller GPU: fast ones only
        yield c
    finally:
        for process in [*c.workers, *(p for p, _ in c.fronts)]:
            process.terminate()
        for process in [*c.workers, *(p for p, _ in c.fronts)]:
            process.wait(timeout=30)
        c.redis_process.terminate()
        c.redis_process.wait(timeout=10)
        s3.stop()


def _keys() -> dict:
    return {"aws_access_key_id": AWS["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": AWS["AWS_SECRET_ACCESS_KEY"]}


def submit(client: httpx.Client, base: str, endpoint: str, body: dict) -> dict:
    response = client.post(f"{base}/queue/{endpoint}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def status_at(client: httpx.Client, base: str, request_id: str) -> dict:
    return client.get(f"{base}/queue/fal-ai/flux-2/requests/{request_id}/status", params={"logs": 1}).json()


def wait_done(client: httpx.Client, base: str, request_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = status_at(client, base, request_id)
        if status["status"] == "COMPLETED":
            return status
        time.sleep(0.05)
    raise AssertionError(f"{request_id} did not complete")


def wait_running(client: httpx.Client, base: str, request_id: str) -> dict:
    """Until the request has run at least one denoising step."""
    while True:
        status = status_at(client, base, request_id)
        if any(line["message"].startswith("step ") for line in status.get("logs") or []):
            return status
        assert status["status"] != "COMPLETED", status
        time.sleep(0.05)


def test_health_shows_live_workers_and_what_they_run(cluster):
    (_, a), (_, b) = cluster.fronts
    health = httpx.get(f"{a}/health").json()
    assert health["waiting"] is None and health["capabilities"] is None  # no model in a front-end
    workers = {w["pid"]: w for w in health["workers"]}
    assert sorted(workers) == sorted(p.pid for p in cluster.workers)
    profiles = sorted(w["profiles"] for w in workers.values())
    assert profiles == [["edit", "turbo", "flash"], ["turbo", "flash"]]
    assert all(w["device"] == "cpu" and w["capabilities"]["profiles"] for w in workers.values())
    assert sorted(w["pid"] for w in cluster.live_workers(b)) == sorted(workers)  # the same list on every front-end


def test_fifty_requests_through_two_front_ends_all_complete_exactly_once(cluster):
    (_, a), (_, b) = cluster.fronts
    with httpx.Client(timeout=60) as client:
        handles = []
        for i in range(50):  # the fewest steps (4) at the smallest size, to keep CPU time down
            endpoint = "fal-ai/flux-2/edit" if i % 5 == 0 else "fal-ai/flux-2/flash/edit"
            body = {**QUICK, "seed": i, **({"num_inference_steps": 4} if endpoint.endswith("2/edit") else {})}
            handles.append((endpoint, submit(client, (a, b)[i % 2], endpoint, body)))
        assert len({h["request_id"] for _, h in handles}) == 50
        for i, (endpoint, handle) in enumerate(handles):
            done = wait_done(client, (b, a)[i % 2], handle["request_id"])  # status from the other front-end
            assert done["error"] is None, done
            result = client.get(f"{(a, b)[i % 2]}/queue/fal-ai/flux-2/requests/{handle['request_id']}")
            assert result.status_code == 200 and result.json()["seed"] == i
            starts = [line for line in done["logs"] if line["message"].startswith("Running on worker")]
            assert len(starts) == 1, done["logs"]  # ran once
        # every request ran exactly once over both workers, and only where its profile is served
        worker_logs = cluster.worker_logs()
        for endpoint, handle in handles:
            assert worker_logs.count(f"request {handle['request_id']}: ") > 0
            assert worker_logs.count(f"request {handle['request_id']}: step 1/") == 1
        w1 = (cluster.root / "worker-1.log").read_text()
        w2 = (cluster.root / "worker-2.log").read_text()
        edits = [h["request_id"] for e, h in handles if e == "fal-ai/flux-2/edit"]
        assert all(f"request {r}: edit " in w1 and f"request {r}: " not in w2 for r in edits)
        assert "request " in w2  # the second worker took its share of the fast profiles
        assert cluster.redis.hlen("flux2:req:" + handles[0][1]["request_id"]) > 0


def test_outputs_in_the_bucket_through_presigned_and_proxied_urls(cluster):
    (_, a), (_, b) = cluster.fronts
    with httpx.Client(timeout=60) as client:
        # an input uploaded through front-end b's storage emulation lands in the bucket; a worker fetches it
        target = client.post(f"{b}/storage/upload/initiate", json={"content_type": "image/png"}).json()
        assert target["file_url"].startswith(f"{b}/files/upload-")
        assert client.put(target["upload_url"], content=image_bytes(80, 80, seed=3)).status_code == 200
        handle = submit(client, a, "fal-ai/flux-2/flash/edit", {**QUICK, "image_urls": [target["file_url"]]})
        assert wait_done(client, a, handle["request_id"])["error"] is None
        image = client.get(f"{a}/queue/fal-ai/flux-2/requests/{handle['request_id']}").json()["images"][0]
        assert "X-Amz-Signature=" in image["url"]  # presigned: fetched straight from the bucket
        direct = client.get(image["url"])
        assert direct.status_code == 200 and decode(direct.content).size == (512, 512)
        assert len(direct.content) == image["file_size"]
        proxied = client.get(f"{b}/files/{image['file_name']}")  # the same object, streamed by front-end b
        assert proxied.content == direct.content and proxied.headers["content-type"] == "image/png"
        keys = {o.key for o in cluster.bucket.objects.filter(Prefix="outputs/")}
        assert f"outputs/{image['file_name']}" in keys and target["file_url"].rsplit("/", 1)[1] in str(keys)
        assert client.get(f"{b}/files/nope.png").status_code == 404


def test_sync_endpoint_on_a_front_end_goes_through_the_queue(cluster):
    (_, a), _ = cluster.fronts
    with httpx.Client(timeout=120) as client:
        response = client.post(f"{a}/fal-ai/flux-2/flash/edit", json={**QUICK, "sync_mode": True})
        assert response.status_code == 200, response.text
        assert response.headers["x-fal-request-id"]
        assert response.json()["images"][0]["url"].startswith("data:image/png;base64,")
        bad = client.post(f"{a}/fal-ai/flux-2/flash/edit", json={**QUICK, "image_urls": ["data:image/png;base64,AAAA"]})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "image_urls", 0]
        invalid = client.post(f"{a}/fal-ai/flux-2/flash/edit", json={**QUICK, "num_images": 9})
        assert invalid.status_code == 422 and invalid.json()["detail"][0]["loc"] == ["body", "num_images"]


def test_progress_and_cancel_across_processes(cluster):
    (_, a), (_, b) = cluster.fronts
    with httpx.Client(timeout=60) as client:
        # a long edit runs on worker-1 (the only one serving `edit`), so the next edit waits in the queue
        running = submit(client, a, "fal-ai/flux-2/edit", SLOW)
        wait_running(client, b, running["request_id"])  # step logs from worker-1 seen through front-end b
        events = []
        with client.stream("GET", f"{b}/queue/fal-ai/flux-2/requests/{running['request_id']}/status/stream") as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line.removeprefix("data: ")))
                    if len(events) == 3:
                        break
        assert all(e["status"] == "IN_PROGRESS" for e in events)
        steps = [len(e["logs"]) for e in events]
        assert steps == sorted(steps) and steps[-1] > steps[0]  # each event: new step logs
        queued = submit(client, a, "fal-ai/flux-2/edit", QUICK | {"num_inference_steps": 4})
        assert status_at(client, b, queued["request_id"])["status"] == "IN_QUEUE"
        cancel = client.put(f"{b}/queue/fal-ai/flux-2/requests/{queued['request_id']}/cancel")
        assert cancel.status_code == 202
        assert status_at(client, a, queued["request_id"])["error_type"] == "request_cancelled"  # at once
        cancel = client.put(f"{b}/queue/fal-ai/flux-2/requests/{running['request_id']}/cancel")
        assert cancel.status_code == 202 and cancel.json() == {"status": "CANCELLATION_REQUESTED"}
        done = wait_done(client, a, running["request_id"])
        assert done["error_type"] == "request_cancelled"
        assert sum(line["message"].startswith("step ") for line in done["logs"]) < 50
        assert client.get(f"{a}/queue/fal-ai/flux-2/requests/{running['request_id']}").status_code == 400
        # the worker is free again
        again = submit(client, a, "fal-ai/flux-2/edit", QUICK | {"num_inference_steps": 4})
        assert wait_done(client, b, again["request_id"])["error"] is None


def test_a_stopping_front_end_ends_its_status_streams(cluster):
    """SIGTERM: a front-end ends its open status streams and exits, instead of waiting for their requests."""
    (_, a), _ = cluster.fronts
    process, c = cluster.start_front("front-c")
    cluster.fronts.pop()
    with httpx.Client(timeout=60) as client:
        running = submit(client, c, "fal-ai/flux-2/edit", SLOW)
        url = f"{c}/queue/fal-ai/flux-2/requests/{running['request_id']}/status/stream"
        with client.stream("GET", url) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)  # the 50-step job goes on meanwhile: the stream did not hold the shutdown
            assert all(not line.startswith("data: ") or "COMPLETED" not in line for line in lines)
        assert client.put(f"{a}/queue/fal-ai/flux-2/requests/{running['request_id']}/cancel").status_code == 202
        wait_done(client, a, running["request_id"])


def test_a_restarted_front_end_still_serves_status_and_results(cluster):
    process, a = cluster.fronts[0]
    with httpx.Client(timeout=60) as client:
        finished = submit(client, a, "fal-ai/flux-2/flash/edit", QUICK)
        wait_done(client, a, finished["request_id"])
        pending = submit(client, a, "fal-ai/flux-2/flash/edit", QUICK)
        process.kill()  # the front-end dies right after accepting a request
        process.wait(timeout=30)
        cluster.fronts.pop(0)
        _, a2 = cluster.start_front("front-a2")
        for handle in (finished, pending):
            done = wait_done(client, a2, handle["request_id"])
            assert done["error"] is None
            result = client.get(f"{a2}/queue/fal-ai/flux-2/requests/{handle['request_id']}")
            assert result.status_code == 200 and result.json()["images"][0]["width"] == 512
        cluster.fronts.insert(0, cluster.fronts.pop())


def test_a_redis_outage_is_ridden_out_and_the_running_job_recorded_once(cluster):
    """Redis killed mid-job and started again on its port (its AOF kept) after longer than the workers' claims and
    heartbeats last: the front-ends answer 503 with Retry-After meanwhile (no address), the worker finishes the job,
    holds its result and records it when Redis is back; the job ran once and no process died."""
    (_, a), (_, b) = cluster.fronts
    port = int(cluster.redis_url.rsplit(":", 1)[1].split("/")[0])
    with httpx.Client(timeout=60) as client:
        handle = submit(client, a, "fal-ai/flux-2/edit", QUICK | {"num_inference_steps": 8, "seed": 7})
        wait_running(client, a, handle["request_id"])
        cluster.redis_process.kill()  # no shutdown: what the AOF (appendfsync always) holds is what comes back
        cluster.redis_process.wait(timeout=10)
        refused = client.post(f"{b}/queue/fal-ai/flux-2/flash/edit", json=QUICK)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5", refused.text
        assert refused.json()["detail"] == "The request queue is unreachable for the moment; try again shortly"
        assert refused.headers["x-fal-retryable"] == "true"
        status = client.get(f"{a}/queue/fal-ai/flux-2/requests/{handle['request_id']}/status")
        assert status.status_code == 503 and str(port) not in status.text
        health = client.get(f"{a}/health")
        assert health.status_code == 200 and health.json()["queue"] == {"reachable": False}
        # down past the visibility timeout (3 s) and the heartbeat TTL (2 s), until the job is done and its result held
        held = f"request {handle['request_id']}: holding its outcome until the queue is reachable again"
        back_at, deadline = time.monotonic() + 6, time.monotonic() + 120
        while held not in (cluster.root / "worker-1.log").read_text() or time.monotonic() < back_at:
            assert time.monotonic() < deadline, "the worker did not finish the job"
            time.sleep(0.2)
        cluster.redis_process, _ = start_redis(cluster.root / "redis", port=port, appendonly=True)
        done = wait_done(client, b, handle["request_id"], timeout=120)
        assert done["error"] is None, done
        assert sum(line["message"].startswith("Running on worker") for line in done["logs"]) == 1
        assert cluster.worker_logs().count(f"request {handle['request_id']}: step 1/") == 1  # ran once
        assert all(w.poll() is None for w in cluster.workers) and all(p.poll() is None for p, _ in cluster.fronts)
        again = submit(client, b, "fal-ai/flux-2/flash/edit", QUICK)  # and the cluster serves on
        assert wait_done(client, a, again["request_id"])["error"] is None


def test_a_redis_emptied_by_flushall_serves_on_and_health_says_what_was_lost(cluster):
    (_, a), (_, b) = cluster.fronts
    with httpx.Client(timeout=60) as client:
        before = submit(client, a, "fal-ai/flux-2/flash/edit", QUICK)
        wait_done(client, a, before["request_id"])
        cluster.redis.flushall()  # as a restart without persistence, or a failover to an empty replica
        after = submit(client, b, "fal-ai/flux-2/flash/edit", QUICK)
        assert wait_done(client, a, after["request_id"])["error"] is None  # the workers' groups are back
        assert client.get(f"{a}/queue/fal-ai/flux-2/requests/{before['request_id']}/status").status_code == 404
        for front in (a, b):
            queue = client.get(f"{front}/health").json()["queue"]
            assert queue["reachable"] and queue["reset_at"] > 0, queue
            assert queue["lost"].startswith("every request accepted before this time")
        deadline = time.monotonic() + 30  # the workers advertise themselves again at their next heartbeat
        while len(cluster.live_workers(a)) < len(cluster.workers):
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_the_fault_benchmark_runs_small(cluster):
    """benchmarks/scale_out.py --faults, in small, on this cluster: a Redis restart then a FLUSHALL while requests
    arrive; every accepted request completes across the restart, none is lost then, no worker dies."""
    from benchmarks.scale_out import FaultTarget, fault_phase

    port = int(cluster.redis_url.rsplit(":", 1)[1].split("/")[0])

    def stop():
        cluster.redis_process.kill()
        cluster.redis_process.wait(timeout=10)

    def start():
        cluster.redis_process, _ = start_redis(cluster.root / "redis", port=port, appendonly=True)

    target = FaultTarget(
        fronts=[url for _, url in cluster.fronts],
        stop_redis=stop,
        start_redis=start,
        flush_redis=cluster.redis.flushall,
        worker_logs=cluster.worker_logs,
        workers=cluster.workers,
    )
    restart = fault_phase(target, "restart", QUICK, jobs=6, pace_s=0.5, outage_s=3)
    assert restart["refused_503"] >= 1 and restart["recovery_s"]["accepting_again"] is not None, restart
    assert restart["completed"] == restart["accepted"] and restart["lost"] == 0 and restart["worker_deaths"] == 0
    assert restart["recovery_s"]["all_accepted_completed"] > 0
    flushed = fault_phase(target, "flushall", QUICK, jobs=6, pace_s=0.3, outage_s=0)
    assert flushed["refused_503"] == 0 and flushed["completed"] + flushed["lost"] == 6, flushed
    assert flushed["completed"] >= 4 and flushed["worker_deaths"] == 0  # those after the FLUSHALL all ran


def test_a_killed_workers_request_finishes_on_the_other_worker(cluster):
    (_, a), (_, b) = cluster.fronts
    with httpx.Client(timeout=60) as client:
        # flash runs on either worker: kill whichever took it, mid-run
        handle = submit(client, a, "fal-ai/flux-2/flash/edit", QUICK)
        status = wait_running(client, a, handle["request_id"])
        runner = next(line["message"] for line in status["logs"] if line["message"].startswith("Running on worker"))
        victim = next(w for w in cluster.workers if f"-{w.pid}-" in runner)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        cluster.workers.remove(victim)
        done = wait_done(client, b, handle["request_id"], timeout=120)
        assert done["error"] is None, done
        messages = [line["message"] for line in done["logs"]]
        assert any("stopped before finishing this request" in m for m in messages)
        assert sum(m.startswith("Running on worker") for m in messages) == 2
        assert client.get(f"{b}/queue/fal-ai/flux-2/requests/{handle['request_id']}").status_code == 200
        # the dead worker leaves /health once its heartbeat expires
        deadline = time.monotonic() + 30
        while victim.pid in [w["pid"] for w in cluster.live_workers(a)]:
            assert time.monotonic() < deadline, "dead worker still listed"
            time.sleep(0.2)
        assert [w["pid"] for w in cluster.live_workers(b)] == [cluster.workers[0].pid]
