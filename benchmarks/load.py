"""Load on loopback: many clients submitting to the queue and polling status at once; nothing lost, nothing doubled.

    python -m benchmarks.load [--clients C] [--requests N] [--poll-s S] [--out FILE]

Starts the real server (a subprocess, the tiny model unless --weights) and C concurrent clients, each with its own
connection pool, like separate fal_client processes. Between them they submit N requests to the queue (turbo and
flash in turn, each with its own seed and prompt), all at once at the start, then poll each request's `status`
every S seconds (fal_client's 0.1 s) until COMPLETED and fetch its result.

Checked, and reported as counts that must be zero:
- lost: a submitted request that never reaches COMPLETED with a result (within the run's time limit);
- wrong: a result that is not this request's (its seed differs) or not a decodable image of the asked size;
- duplicated: request ids handed out twice, or the model run more often than requests were accepted (the
  server's own /metrics: finished queue jobs, and denoising steps against the steps N requests need);
- 5xx: any answer with a 5xx status (any other unexpected status is counted apart).
Reported: throughput (submits, status calls and completed jobs per second) and latency p50/p99 of submit and
status calls. Writes JSON (device, versions, exact command) and a markdown table.

The tiny model makes each job short, so this loads the HTTP and queue layers, which is what it is for.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import PIL.Image
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.loopback import start_server
from benchmarks.overhead import device_name, percentile, reference_png, versions
from benchmarks.report import write

ENDPOINTS = {"fal-ai/flux-2/turbo/edit": 8, "fal-ai/flux-2/flash/edit": 4}  # endpoint -> denoising steps
SIZE = 512  # the smallest output fal's API allows
EXPECTED_STATUS = {200, 202}


@dataclass
class Tally:
    submit_s: list[float] = field(default_factory=list)
    status_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    submitted: dict[str, dict] = field(default_factory=dict)  # request id -> {endpoint, seed}
    duplicate_ids: int = 0
    completed: set[str] = field(default_factory=set)
    wrong: list[str] = field(default_factory=list)
    last_submit: float = 0.0  # time.monotonic() when the last submit was answered

    def count(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1


async def call(client: httpx.AsyncClient, tally: Tally, samples: list[float], method: str, url: str, **kw):
    started = time.perf_counter()
    response = await client.request(method, url, **kw)
    samples.append(time.perf_counter() - started)
    tally.count(response.status_code)
    return response


async def one_client(url: str, jobs: list[dict], tally: Tally, poll_s: float, deadline: float) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        mine = []
        for body, endpoint in jobs:  # submit everything first: the queue fills up
            response = await call(client, tally, tally.submit_s, "POST", f"{url}/queue/{endpoint}", json=body)
            if response.status_code != 200:
                continue
            submitted = response.json()
            if submitted["request_id"] in tally.submitted:
                tally.duplicate_ids += 1
            tally.submitted[submitted["request_id"]] = {"endpoint": endpoint, "seed": body["seed"]}
            tally.last_submit = max(tally.last_submit, time.monotonic())
            mine.append((submitted, body))
        for submitted, body in mine:
            while time.monotonic() < deadline:
                status = await call(client, tally, tally.status_s, "GET", submitted["status_url"])
                if status.status_code == 200 and status.json()["status"] == "COMPLETED":
                    break
                await asyncio.sleep(poll_s)
            else:
                return  # out of time: the rest of this client's requests count as lost
            result = await call(client, tally, [], "GET", submitted["response_url"])
            problem = check_result(result, body)
            if problem:
                tally.wrong.append(f"{submitted['request_id']}: {problem}")
            tally.completed.add(submitted["request_id"])


def check_result(response: httpx.Response, body: dict) -> str | None:
    if response.status_code != 200:
        return f"result answered {response.status_code}: {response.text[:200]}"
    output = response.json()
    if output["seed"] != body["seed"]:
        return f"seed {output['seed']} is not the request's {body['seed']}"
    if len(output["images"]) != 1:
        return f"{len(output['images'])} images"
    data = base64.b64decode(output["images"][0]["url"].partition(",")[2])
    image = PIL.Image.open(io.BytesIO(data))
    image.load()
    if image.size != (SIZE, SIZE):
        return f"image is {image.size}, asked for {(SIZE, SIZE)}"
    return None


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus sample's values over the series matching `labels` (prometheus-client's parser)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def drive(url: str, clients: int, requests: int, poll_s: float, time_limit_s: float) -> tuple[Tally, float]:
    reference = "data:image/png;base64," + base64.b64encode(reference_png(64)).decode()
    endpoints = list(ENDPOINTS)
    jobs = [
        (
            {
                "prompt": f"load test request {i}",
                "image_urls": [reference],
                "image_size": {"width": SIZE, "height": SIZE},
                "seed": 1000 + i,
                "sync_mode": True,  # the image in the result: checked without another round trip
                "enable_safety_checker": False,
            },
            endpoints[i % len(endpoints)],
        )
        for i in range(requests)
    ]
    tally = Tally()
    started = time.monotonic()
    deadline = started + time_limit_s
    await asyncio.gather(*(one_client(url, jobs[c::clients], tally, poll_s, deadline) for c in range(clients)))
    tally.last_submit -= started
    return tally, time.monotonic() - started


def run(clients: int, requests: int, poll_s: float, time_limit_s: float, weights: Path | None, command: str) -> dict:
    from server.cli import ensure_tiny

    weights = weights or ensure_tiny()
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_server(weights, Path(tmp) / "data", Path(tmp) / "server.log")
        try:
            before = httpx.get(f"{url}/metrics").text
            tally, wall_s = asyncio.run(drive(url, clients, requests, poll_s, time_limit_s))
            after = httpx.get(f"{url}/metrics").text
            healthy = httpx.get(f"{url}/health").json()["status"] == "ok"
        finally:
            process.terminate()
            process.wait(timeout=30)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    accepted = len(tally.submitted)
    steps_needed = sum(ENDPOINTS[r["endpoint"]] - 1 for r in tally.submitted.values())  # step 1 isn't timed
    jobs_run = delta("flux2_jobs_total", mode="queue")
    steps_run = delta("flux2_step_seconds_count")
    server_errors = sum(n for status, n in tally.statuses.items() if status >= 500)
    results = {
        "clients": clients,
        "requests": requests,
        "accepted": accepted,
        "completed": len(tally.completed),
        "lost": accepted - len(tally.completed),
        "wrong": len(tally.wrong),
        "wrong_examples": tally.wrong[:5],
        "duplicated_ids": tally.duplicate_ids,
        "jobs_run": jobs_run,
        "duplicated_runs": jobs_run - accepted,
        "steps_run": steps_run,
        "steps_needed": steps_needed,
        "server_errors_5xx": server_errors,
        "http_statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "unexpected_statuses": sum(n for s, n in tally.statuses.items() if s not in EXPECTED_STATUS and s < 500),
        "healthy_after": healthy,
        "wall_s": wall_s,
        "submits_per_s": len(tally.submit_s) / tally.last_submit,  # while all clients were submitting
        "status_calls": len(tally.status_s),
        "status_calls_per_s": len(tally.status_s) / wall_s,
        "jobs_per_s": len(tally.completed) / wall_s,
        "submit_p50_s": percentile(tally.submit_s, 50),
        "submit_p99_s": percentile(tally.submit_s, 99),
        "status_p50_s": percentile(tally.status_s, 50),
        "status_p99_s": percentile(tally.status_s, 99),
    }
    return {
        "benchmark": "load",
        "device": device_name(),
        "versions": versions(),
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "weights": "tiny random-weight FLUX.2" if "tiny" in str(weights) else str(weights),
        "results": results,
        "ok": all(
            results[k] == 0
            for k in ("lost", "wrong", "duplicated_ids", "duplicated_runs", "server_errors_5xx", "unexpected_statuses")
        )
        and steps_run == steps_needed
        and healthy,
        "note": "All clients and the server share this machine's cores; the tiny model keeps jobs short, so the "
        "HTTP and queue layers carry the load. Latencies are of calls made while the model runs.",
    }


def markdown(report: dict) -> str:
    r = report["results"]
    rows = [
        (
            "| clients | requests | completed | lost | wrong | duplicated | 5xx | status calls | submits/s | jobs/s | "
            "status calls/s | submit p50 / p99 | status p50 / p99 |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        (
            f"| {r['clients']} | {r['requests']} | {r['completed']} | {r['lost']} | {r['wrong']} | "
            f"{r['duplicated_ids'] + r['duplicated_runs']:g} | {r['server_errors_5xx']} | {r['status_calls']} | "
            f"{r['submits_per_s']:.0f} | {r['jobs_per_s']:.2f} | {r['status_calls_per_s']:.0f} | "
            f"{r['submit_p50_s'] * 1000:.0f} / {r['submit_p99_s'] * 1000:.0f} ms | "
            f"{r['status_p50_s'] * 1000:.0f} / {r['status_p99_s'] * 1000:.0f} ms |"
        ),
    ]
    head = f"{report['benchmark']} — {report['device']} — `{report['command']}`"
    return head + "\n\n" + "\n".join(rows) + "\n\n" + report["note"] + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=25)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--poll-s", type=float, default=0.1, help="status poll interval (fal_client's is 0.1 s)")
    parser.add_argument("--time-limit-s", type=float, default=600, help="requests not done by then count as lost")
    parser.add_argument("--weights", type=Path, help="weights directory (default: the tiny model)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu-load.json"))
    args = parser.parse_args(argv)
    command = " ".join(["python -m benchmarks.load", *(sys.argv[1:] if argv is None else argv)])
    report = run(args.clients, args.requests, args.poll_s, args.time_limit_s, args.weights, command)
    write(report, args.out, markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
