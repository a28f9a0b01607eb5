"""Scale-out queue overhead and cross-process status-stream latency, on loopback.

    python -m benchmarks.scale_out [--jobs N] [--stream-steps S] [--out FILE]
    python -m benchmarks.scale_out --faults [--fault-jobs N] [--outage-s S] [--out FILE]

Starts a private redis-server, two API front-ends (`serve --queue`, no model) and one worker (`worker --queue`,
the tiny model), all as separate processes, and for comparison the embedded server (SQLite queue, model in the
same process). For each, N jobs run one at a time: submitted at front-end A, followed on front-end B's status
stream (server-sent events) until COMPLETED, then the result fetched. Reported per job (median, p90):
- end to end: submit call to the COMPLETED event;
- queue overhead: end to end minus the run itself as the worker measured it (`metrics.inference_time`: input
  fetch, model, encode), i.e. what the queue, the hops between processes and the status stream add;
- pickup: accepted -> claimed by the idle worker (the request record's `started_at - created_at`).
Status-stream latency: during one long job, for each denoising step, the time from the worker writing the step's
log line (its timestamp) to the event carrying it arriving at the client through the other front-end.
Writes JSON (device, versions, exact command) and prints a markdown table.

`--faults`: the same kind of cluster with two front-ends and two workers, output files in an S3 bucket (moto's
server on loopback) and Redis with the README's AOF settings; requests are submitted at a steady pace through both
front-ends while Redis is (1) killed and started again on its port after `--outage-s`, then (2) emptied with
FLUSHALL. Reported per phase: submits accepted and refused (503 while Redis is down), requests completed, lost
(accepted, never completed), run twice (their first step logged by more than one run), worker deaths, and the
recovery: seconds from Redis back to the first submit accepted again, and to every accepted request completed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

from benchmarks.loopback import free_port, start_redis, start_server, start_worker
from benchmarks.overhead import device_name, reference_png, versions
from benchmarks.report import command, write

PROFILE_ENDPOINT = "fal-ai/flux-2/flash/edit"


def data_uri(png: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode()


def follow(client: httpx.Client, status_url: str, on_event=None) -> dict:
    """Read a status stream to its COMPLETED event; returns that event."""
    with client.stream("GET", status_url + "/stream", params={"logs": 1}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line.removeprefix("data: "))
                if on_event:
                    on_event(event, time.time())
                if event["status"] == "COMPLETED":
                    return event
    raise RuntimeError("status stream ended before COMPLETED")


def run_jobs(client: httpx.Client, submit_base: str, follow_base: str, body: dict, jobs: int) -> list[dict]:
    samples = []
    for i in range(jobs + 1):  # the first is a warm-up
        started = time.perf_counter()
        submitted = time.time()
        handle = client.post(f"{submit_base}/queue/{PROFILE_ENDPOINT}", json={**body, "seed": i}).json()
        status_url = f"{follow_base}/queue/fal-ai/flux-2/requests/{handle['request_id']}/status"
        done = follow(client, status_url)
        wall = time.perf_counter() - started
        assert done["error"] is None, done
        result = client.get(f"{follow_base}/queue/fal-ai/flux-2/requests/{handle['request_id']}")
        assert result.status_code == 200
        claimed = next(
            (datetime.fromisoformat(x["timestamp"]).timestamp() for x in done["logs"]), None
        )  # first log line: written when the request was claimed (or, embedded, when it started)
        if i:
            samples.append(
                {
                    "end_to_end_s": wall,
                    "inference_s": done["metrics"]["inference_time"],
                    "overhead_s": wall - done["metrics"]["inference_time"],
                    "pickup_s": claimed - submitted if claimed else None,
                }
            )
    return samples


def stream_latency(client: httpx.Client, submit_base: str, follow_base: str, body: dict) -> list[float]:
    handle = client.post(f"{submit_base}/queue/fal-ai/flux-2/edit", json=body).json()
    seen: set[str] = set()
    latencies: list[float] = []

    def on_event(event, received):
        for line in event.get("logs") or []:
            key = line["timestamp"] + line["message"]
            if line["message"].startswith("step ") and key not in seen:
                seen.add(key)
                latencies.append(received - datetime.fromisoformat(line["timestamp"]).timestamp())

    follow(client, f"{follow_base}/queue/fal-ai/flux-2/requests/{handle['request_id']}/status", on_event)
    return latencies


def summary(samples: list[dict]) -> dict:
    out = {}
    for key in ("end_to_end_s", "inference_s", "overhead_s", "pickup_s"):
        values = [s[key] for s in samples if s[key] is not None]
        out[key] = {"median": statistics.median(values), "p90": float(np.percentile(values, 90))}
    return out


def run(weights: Path, jobs: int, stream_steps: int, work: Path) -> dict:
    body = {"prompt": "p", "image_urls": [data_uri(reference_png(512))], "image_size": "square"}
    long_body = {**body, "num_inference_steps": stream_steps, "seed": 1}
    processes = []
    results: dict = {}
    try:
        redis_process, redis_url = start_redis(work / "redis")
        processes.append(redis_process)
        shared = work / "shared"
        env = {"FLUX2_STORAGE": f"file://{shared}"}
        front_a, url_a = start_server(None, work / "a", work / "a.log", "--queue", redis_url, env=env)
        front_b, url_b = start_server(None, work / "b", work / "b.log", "--queue", redis_url, env=env)
        worker = start_worker(weights, redis_url, work / "w", work / "w.log", env=env)
        processes += [front_a, front_b, worker]
        with httpx.Client(timeout=600) as client:
            results["redis"] = summary(run_jobs(client, url_a, url_b, body, jobs))
            latencies = stream_latency(client, url_a, url_b, long_body)
            results["redis"]["status_stream_latency_s"] = {
                "p50": float(np.percentile(latencies, 50)),
                "p99": float(np.percentile(latencies, 99)),
                "max": max(latencies),
                "steps": len(latencies),
            }
        for process in (front_a, front_b, worker):
            process.terminate()
            process.wait(timeout=60)

        embedded, url = start_server(weights, work / "e", work / "e.log")
        processes.append(embedded)
        with httpx.Client(timeout=600) as client:
            results["sqlite_embedded"] = summary(run_jobs(client, url, url, body, jobs))
            latencies = stream_latency(client, url, url, long_body)
            results["sqlite_embedded"]["status_stream_latency_s"] = {
                "p50": float(np.percentile(latencies, 50)),
                "p99": float(np.percentile(latencies, 99)),
                "max": max(latencies),
                "steps": len(latencies),
            }
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=60)
    return results


@dataclass
class FaultTarget:
    """A running cluster to inject Redis faults into (this benchmark's own, or a test's)."""

    fronts: list[str]  # front-end base URLs
    stop_redis: Callable[[], None]  # kill it (no shutdown)
    start_redis: Callable[[], None]  # start it again on its port, with its AOF
    flush_redis: Callable[[], None]  # FLUSHALL
    worker_logs: Callable[[], str]  # all workers' logs so far
    workers: list  # their processes (a death is counted)


def fault_phase(target: FaultTarget, fault: str, body: dict, jobs: int, pace_s: float, outage_s: float) -> dict:
    """Submit `jobs` requests, one every `pace_s` through the front-ends in turn; a third of the way in, inject
    `fault` ("restart": Redis killed, started again after `outage_s`; "flushall"); then follow every accepted
    request to COMPLETED (or to 404: lost)."""
    accepted: list[str] = []
    refused = 0
    fault_at = jobs // 3
    down_at = 0.0
    back_at: float | None = None
    accepting_again_at: float | None = None
    with httpx.Client(timeout=60) as client:
        for i in range(jobs):
            if i == fault_at:
                if fault == "restart":
                    target.stop_redis()
                    down_at = time.monotonic()
                else:
                    target.flush_redis()
                    back_at = time.monotonic()
            if fault == "restart" and back_at is None and i > fault_at and time.monotonic() - down_at >= outage_s:
                target.start_redis()
                back_at = time.monotonic()
            front = target.fronts[i % len(target.fronts)]
            response = client.post(f"{front}/queue/{PROFILE_ENDPOINT}", json={**body, "seed": i})
            if response.status_code == 200:
                accepted.append(response.json()["request_id"])
                if back_at is not None and accepting_again_at is None:
                    accepting_again_at = time.monotonic()
            else:
                assert response.status_code == 503 and response.headers.get("retry-after"), response.text
                refused += 1
            time.sleep(pace_s)
        if back_at is None:  # the outage outlasted the submits
            time.sleep(max(0.0, outage_s - (time.monotonic() - down_at)))
            target.start_redis()
            back_at = time.monotonic()
        while accepting_again_at is None:  # no submit came after Redis was back: one more, until accepted
            response = client.post(f"{target.fronts[0]}/queue/{PROFILE_ENDPOINT}", json={**body, "seed": jobs})
            if response.status_code == 200:
                accepted.append(response.json()["request_id"])
                accepting_again_at = time.monotonic()
            else:
                time.sleep(0.1)
        outcome = {}
        pending = set(accepted)
        deadline = time.monotonic() + 1800  # a loaded 2-core machine runs a tiny-model job in ~20 s
        while pending and time.monotonic() < deadline:
            for request_id in list(pending):
                front = target.fronts[hash(request_id) % len(target.fronts)]
                status = client.get(f"{front}/queue/fal-ai/flux-2/requests/{request_id}/status")
                if status.status_code == 404:
                    outcome[request_id] = "lost"
                elif status.status_code == 200 and status.json()["status"] == "COMPLETED":
                    outcome[request_id] = "ok" if status.json()["error"] is None else status.json()["error_type"]
                else:
                    continue
                pending.discard(request_id)
            time.sleep(0.2)
        drained_at = time.monotonic()
        unfinished = {  # what those never finished (nor lost) answer at the end
            request_id: client.get(
                f"{target.fronts[0]}/queue/fal-ai/flux-2/requests/{request_id}/status", params={"logs": 1}
            ).text
            for request_id in sorted(pending)
        }
    logs = target.worker_logs()
    starts = {request_id: logs.count(f"request {request_id}: step 1/") for request_id in accepted}
    return {
        "fault": fault,
        "outage_s": outage_s if fault == "restart" else 0.0,
        "submitted": jobs,  # (plus one after Redis was back, if none came: accepted counts it)
        "accepted": len(accepted),
        "refused_503": refused,
        "completed": sum(o == "ok" for o in outcome.values()),
        "failed": sorted(o for o in outcome.values() if o not in ("ok", "lost")),
        "lost": sum(o == "lost" for o in outcome.values()) + len(pending),
        "never_ran": sum(n == 0 for n in starts.values()),
        "run_twice": sum(n > 1 for n in starts.values()),
        "worker_deaths": sum(w.poll() is not None for w in target.workers),
        "unfinished": unfinished,
        "recovery_s": {
            "accepting_again": None if accepting_again_at is None else accepting_again_at - back_at,
            "all_accepted_completed": drained_at - back_at,
        },
    }


def run_faults(weights: Path, jobs: int, outage_s: float, pace_s: float, work: Path) -> dict:
    import boto3
    from moto.server import ThreadedMotoServer

    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    s3_port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    s3.start()
    endpoint = f"http://127.0.0.1:{s3_port}"
    boto3.resource(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).Bucket("flux2").create()
    env = {
        **keys,
        "FLUX2_STORAGE": f"s3://flux2/outputs?endpoint_url={endpoint}&region=us-east-1",
        "FLUX2_SUPERVISE": "0",  # a worker that dies stays dead: counted
        "FLUX2_QUEUE_VISIBILITY_TIMEOUT_S": "5",
        "FLUX2_WORKER_HEARTBEAT_TTL_S": "3",
        "FLUX2_QUEUE_RETRY_MAX_S": "2",
    }
    redis_dir = work / "redis"
    redis_process, redis_url = start_redis(redis_dir, appendonly=True)
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    processes: list = []
    state = {"redis": redis_process}

    def stop() -> None:
        state["redis"].kill()
        state["redis"].wait(timeout=30)

    def start() -> None:
        state["redis"], _ = start_redis(redis_dir, port=port, appendonly=True)

    def flush() -> None:
        import redis

        redis.Redis.from_url(redis_url).flushall()

    try:
        fronts = [start_server(None, work / name, work / f"{name}.log", "--queue", redis_url, env=env) for name in "ab"]
        workers = [start_worker(weights, redis_url, work / n, work / f"{n}.log", env=env) for n in ("w1", "w2")]
        processes = [p for p, _ in fronts] + workers
        target = FaultTarget(
            fronts=[url for _, url in fronts],
            stop_redis=stop,
            start_redis=start,
            flush_redis=flush,
            worker_logs=lambda: "".join((work / f"{n}.log").read_text() for n in ("w1", "w2")),
            workers=workers,
        )
        body = {"prompt": "p", "image_urls": [data_uri(reference_png(512))], "image_size": "square"}
        return {
            "restart": fault_phase(target, "restart", body, jobs, pace_s, outage_s),
            "flushall": fault_phase(target, "flushall", body, jobs, pace_s, outage_s),
        }
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=60)
        state["redis"].terminate()
        state["redis"].wait(timeout=30)
        s3.stop()


def fault_table(report: dict) -> str:
    rows = [
        f"{report['benchmark']} — {report['device']} — `{report['command']}`",
        "",
        "| fault | accepted | refused (503) | completed | lost | run twice | worker deaths | accepting again "
        + "| all completed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"].values():
        again = r["recovery_s"]["accepting_again"]
        rows.append(
            f"| {r['fault']} ({r['outage_s']:.0f} s) | {r['accepted']}/{r['submitted']} | {r['refused_503']} "
            f"| {r['completed']} | {r['lost']} | {r['run_twice']} | {r['worker_deaths']} "
            f"| {'-' if again is None else f'{again:.1f} s'} | {r['recovery_s']['all_accepted_completed']:.1f} s |"
        )
    return "\n".join(rows)


def table(report: dict) -> str:
    rows = [
        f"{report['benchmark']} — {report['device']} — `{report['command']}`",
        "",
        "| deployment | end to end | run (worker) | queue overhead | pickup | stream latency p50 / p99 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in report["results"].items():
        s = r["status_stream_latency_s"]
        rows.append(
            f"| {name} | {r['end_to_end_s']['median']:.3f} s | {r['inference_s']['median']:.3f} s "
            f"| {r['overhead_s']['median'] * 1000:.0f} ms (p90 {r['overhead_s']['p90'] * 1000:.0f}) "
            f"| {r['pickup_s']['median'] * 1000:.0f} ms | {s['p50'] * 1000:.0f} / {s['p99'] * 1000:.0f} ms |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--stream-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/cpu-scale-out[-faults].json")
    parser.add_argument("--faults", action="store_true", help="the fault run: Redis restarted, then emptied")
    parser.add_argument("--fault-jobs", type=int, default=30, help="requests submitted per fault phase")
    parser.add_argument("--outage-s", type=float, default=20.0, help="seconds Redis stays down in the restart phase")
    parser.add_argument("--pace-s", type=float, default=0.5, help="seconds between submits in a fault phase")
    parser.add_argument("--work", type=Path, default=None, help="fault run: keep processes' logs here")
    args = parser.parse_args(argv)
    from weights.tiny import build_tiny

    if args.faults:
        return main_faults(args)
    args.out = args.out or Path("benchmarks/results/cpu-scale-out.json")
    with tempfile.TemporaryDirectory(prefix="flux2-scale-bench-") as tmp:
        work = Path(tmp)
        weights = build_tiny(work / "tiny")
        load_before = os.getloadavg()
        results = run(weights, args.jobs, args.stream_steps, work)
        load_after = os.getloadavg()
    report = {
        "benchmark": "scale-out queue overhead (CPU, tiny model, loopback)",
        "command": command("benchmarks.scale_out"),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_name(),
        "versions": versions(),
        "workload": {
            "endpoint": PROFILE_ENDPOINT,
            "size": 512,
            "jobs": args.jobs,
            "stream_steps": args.stream_steps,
            "topology": "redis: redis-server + 2 front-ends + 1 worker (separate processes); submit at A, "
            "status stream and result at B. sqlite_embedded: one process.",
            "statistic": "median and p90 over jobs run one at a time",
        },
        "note": "Status streams poll the queue every 0.1 s (server/http/routes/queue.py STREAM_POLL_S), which bounds "
        "stream latency and adds to end to end. The machine is shared with other work, so absolute figures are "
        "noisy; the differences between the two deployments are what this measures.",
        "load_average_1_5_15_min": {"before": load_before, "after": load_after, "cores": os.cpu_count()},
        "results": results,
    }
    write(report, args.out, table(report))
    return 0


def main_faults(args: argparse.Namespace) -> int:
    from weights.tiny import build_tiny

    out = args.out or Path("benchmarks/results/cpu-scale-out-faults.json")
    with tempfile.TemporaryDirectory(prefix="flux2-fault-bench-") as tmp:
        work = args.work or Path(tmp)
        results = run_faults(build_tiny(work / "tiny"), args.fault_jobs, args.outage_s, args.pace_s, work)
    report = {
        "benchmark": "scale-out under Redis faults (CPU, tiny model, loopback)",
        "command": command("benchmarks.scale_out"),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_name(),
        "versions": versions(),
        "workload": {
            "endpoint": PROFILE_ENDPOINT,
            "size": 512,
            "per_phase": f"{args.fault_jobs} submits, one every {args.pace_s} s through two front-ends in turn; "
            "the fault a third of the way in",
            "topology": "redis-server (appendonly yes, appendfsync always) + moto S3 server + 2 front-ends + 2 "
            "workers (unsupervised), separate processes on loopback",
            "phases": "restart: Redis SIGKILLed, started again on its port with its AOF after outage_s; flushall: "
            "FLUSHALL (Redis emptied, as a restart without persistence)",
        },
        "definitions": {
            "lost": "accepted (200) and never completed (404 once Redis was emptied)",
            "run_twice": "accepted requests whose first denoising step was logged by more than one run",
            "recovery_s.accepting_again": "from Redis back (started again, or emptied) to the next submit accepted",
            "recovery_s.all_accepted_completed": "from Redis back to every accepted request completed or lost",
        },
        "results": results,
    }
    write(report, out, fault_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
