"""Scale-out queue overhead and cross-process status-stream latency, on loopback.

    python -m benchmarks.scale_out [--jobs N] [--stream-steps S] [--out FILE]

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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

from benchmarks.loopback import start_redis, start_server, start_worker
from benchmarks.overhead import device_name, reference_png, versions

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
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu-scale-out.json"))
    args = parser.parse_args(argv)
    from weights.tiny import build_tiny

    with tempfile.TemporaryDirectory(prefix="flux2-scale-bench-") as tmp:
        work = Path(tmp)
        weights = build_tiny(work / "tiny")
        load_before = os.getloadavg()
        results = run(weights, args.jobs, args.stream_steps, work)
        load_after = os.getloadavg()
    report = {
        "benchmark": "scale-out queue overhead (CPU, tiny model, loopback)",
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.scale_out", *sys.argv[1:]]),
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(report) + "\n")
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
