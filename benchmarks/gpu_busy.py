"""How busy the server keeps its GPU: a queue of flash-sized requests against a stand-in model that holds "the GPU"
for a fixed time per step and does no CPU work (it sleeps on the model thread, as the CPU does while a GPU
computes), so everything else the server does (HTTP, fetching and decoding inputs, encoding and storing outputs,
the queue) shows as time the stand-in is idle.

    python -m benchmarks.gpu_busy [--requests N] [--step-s S] [--size PX] [--repeats R] [--out FILE]

Two servers, one after the other, each the real app (`server.http.app.create_app` under uvicorn, in a subprocess)
with the stand-in in place of the model:
- `before`: what settings can switch off: no prefetch and no head start for sync requests
  (FLUX2_PREFETCH_REQUESTS=0), images encoded and stored before the model takes the next request
  (FLUX2_OUTPUT_ASYNC=0), Pillow's PNG at its default level 6 (input decoding is today's in both);
- `after`: the defaults (prefetch 2 requests ahead, sync head start, encode and store beside the model, fpng).
On each: N requests queued at once (fal's queue API, each with one 1024x1024 photo-like PNG reference) with 1 and 4
output images, the reference inline (a data URI) or remote (an HTTP server on loopback sending it at
`--remote-mbps`); then single sync requests on an idle server (the end-to-end latency a caller sees, against the
model time inside it), the reference inline or uploaded first (as fal's clients upload files: fal-js does it for any
Blob input) and sent as its URL. Reported: the share of the steady window (the first model call's start to the last
one's end) the stand-in was busy, and the overhead of a single request (its end-to-end time minus its model time)
as a share of the model time, end to end and the server's part alone (its `Server-Timing`, from the request's
arrival to its answer, minus the model time), split by the server's own `timings`. Goals: >= 98 % busy, overhead
<= 2 % of a 2-second model call. Writes JSON (with the command and the machine) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from benchmarks.encoders import photo_like
from benchmarks.loopback import free_port
from benchmarks.overhead import device_name
from benchmarks.report import command, write

GOALS = {"busy_share_min": 0.98, "single_overhead_share_max": 0.02}
FLASH = "fal-ai/flux-2/flash/edit"
FLASH_STEPS = 4
CONFIGS = {
    "before": {
        "FLUX2_PREFETCH_REQUESTS": "0",
        "FLUX2_OUTPUT_ASYNC": "0",
        "FLUX2_PNG_ENCODER": "pillow",
        "FLUX2_PNG_COMPRESS_LEVEL": "6",
    },
    "after": {},
}
POLL_INTERVAL_S = 0.1  # fal_client's


# --- the server side (a subprocess: `--serve`) ---


def serve(port: int, data_dir: Path, step_s: float, size: int, intervals: Path) -> None:
    """The real app with the stand-in model, until terminated."""
    import uvicorn

    from pipelines import PROFILES, EditCall, EditResult
    from server.config import Settings
    from server.http.app import create_app
    from server.service import model as service_model
    from tests.fake_editor import FakeEditor

    output = photo_like(size, seed=1)  # made once: the stand-in does no CPU work per call
    lock = threading.Lock()

    class StandIn(FakeEditor):
        """Sleeps `step_s` per denoising step (calling back and polling for cancels as the model does); returns
        photo-like images, so encoding them costs what it costs on real outputs."""

        def edit(self, call: EditCall) -> EditResult:
            started = time.perf_counter()
            steps, _ = PROFILES[call.profile].schedule(call.num_inference_steps)
            for step in range(1, steps + 1):
                time.sleep(step_s)
                if call.on_step is not None:
                    call.on_step(step, steps)
            images = [output if output.size == (call.width, call.height) else output.resize((call.width, call.height))]
            ended = time.perf_counter()
            with lock, intervals.open("a") as f:
                f.write(json.dumps([started, ended]) + "\n")
            return EditResult(images=images * call.num_images, steps=steps, prompt=call.prompt, timings={})

    service_model.load_model = lambda *args, **kwargs: StandIn()  # type: ignore[assignment]
    settings = Settings(data_dir=data_dir, port=port, fetch_allow="127.0.0.1", log_level="warning")
    uvicorn.run(create_app(settings, data_dir / "weights"), host="127.0.0.1", port=port, log_level="warning")


# --- the client side ---


class ThrottledFiles:
    """An HTTP server on loopback that sends one file at `mbps` megabytes per second (a remote reference image)."""

    def __init__(self, data: bytes, mbps: float):
        chunk = 64 * 1024

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                for start in range(0, len(data), chunk):
                    self.wfile.write(data[start : start + chunk])
                    time.sleep(chunk / (mbps * 1e6))

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/reference.png"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start(config: str, data_dir: Path, step_s: float, size: int, intervals: Path, log: Path):
    port = free_port()
    env = {**os.environ, **CONFIGS[config]}
    command = [sys.executable, "-m", "benchmarks.gpu_busy", "--serve", str(port), str(data_dir), str(step_s)]
    process = subprocess.Popen(
        [*command, "--size", str(size), "--intervals", str(intervals)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, f"the server exited: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "the server did not get ready"
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


def read_intervals(path: Path, skip: int) -> list[tuple[float, float]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [tuple(json.loads(line)) for line in lines[skip:]]


def queue_run(client: httpx.Client, url: str, body: dict, requests: int, intervals: Path) -> dict:
    """N requests queued at once; returns how busy the stand-in was while it ran them."""
    before = len(read_intervals(intervals, 0))
    submitted = time.perf_counter()
    handles = [client.post(f"{url}/queue/{FLASH}", json={**body, "seed": n}).json() for n in range(requests)]
    for handle in handles:  # served in order: wait for each, as a fal client polls
        while client.get(handle["status_url"]).json()["status"] != "COMPLETED":
            time.sleep(POLL_INTERVAL_S)
    wall = time.perf_counter() - submitted
    for handle in handles:
        answer = client.get(handle["response_url"])
        assert answer.status_code == 200, answer.text[:500]
        assert len(answer.json()["images"]) == body["num_images"]
    spans = read_intervals(intervals, before)
    assert len(spans) == requests, f"{len(spans)} model calls for {requests} requests"
    busy = sum(end - start for start, end in spans)
    window = spans[-1][1] - spans[0][0]
    return {
        "requests": requests,
        "busy_share": busy / window,
        "model_busy_s": busy,
        "steady_window_s": window,
        "end_to_end_s": wall,  # from the first submit to the last result seen (polling every 0.1 s)
        "mean_gap_between_model_calls_s": (window - busy) / max(1, requests - 1),
    }


def server_took(answer: httpx.Response) -> float:
    """Seconds the server took (its `Server-Timing: app;dur=<ms>`: from the request's arrival to its answer)."""
    return float(answer.headers["server-timing"].partition("dur=")[2]) / 1000


def upload(client: httpx.Client, url: str, data: bytes) -> str:
    """The reference uploaded as fal's clients upload files (fal-js `storage.upload`: initiate, then PUT): its URL."""
    target = client.post(f"{url}/storage/upload/initiate", json={"content_type": "image/png", "file_name": "r.png"})
    assert client.put(target.json()["upload_url"], content=data).status_code == 200
    return target.json()["file_url"]


def single_requests(client: httpx.Client, url: str, body: dict, repeats: int, intervals: Path) -> dict:
    """Sync calls on an idle server: end-to-end latency against the model time inside each."""
    samples = []
    for n in range(repeats + 1):  # the first is a warm-up
        before = len(read_intervals(intervals, 0))
        started = time.perf_counter()
        answer = client.post(f"{url}/{FLASH}", json={**body, "seed": 1000 + n})
        wall = time.perf_counter() - started
        assert answer.status_code == 200, answer.text[:500]
        (span,) = read_intervals(intervals, before)
        if n:
            samples.append((wall, span[1] - span[0], answer.json()["timings"], server_took(answer)))
    walls = [wall for wall, _, _, _ in samples]
    models = [model for _, model, _, _ in samples]
    return {
        "repeats": repeats,
        "end_to_end_s": statistics.median(walls),
        "model_s": statistics.median(models),
        "overhead_s": statistics.median(wall - model for wall, model in zip(walls, models)),
        "overhead_share": statistics.median((wall - model) / model for wall, model in zip(walls, models)),
        # the server's part of it: from the request's arrival to its answer (Server-Timing), less the model
        "server_overhead_s": statistics.median(took - model for (_, model, _, took) in samples),
        "server_overhead_share": statistics.median((took - model) / model for (_, model, _, took) in samples),
        # where the overhead goes (medians), from the server's own `timings` in each answer
        "breakdown_s": {
            "fetch_inputs": statistics.median(timings["fetch_inputs"] for _, _, timings, _ in samples),
            "encode_and_store": statistics.median(timings["encode"] for _, _, timings, _ in samples),
            # the server's HTTP, queueing and handing over (Server-Timing less the model and the two above)
            "rest_of_the_server": statistics.median(
                took - model - timings["fetch_inputs"] - timings["encode"] for _, model, timings, took in samples
            ),
            # the client building and sending its JSON body, reading the answer; the network (loopback here)
            "client_and_network": statistics.median(wall - took for wall, _, _, took in samples),
        },
    }


def run(requests: int, step_s: float, size: int, repeats: int, remote_mbps: float) -> dict:
    reference = io.BytesIO()
    photo_like(size, seed=2).save(reference, format="PNG")
    data = reference.getvalue()
    load_before = os.getloadavg()
    remote = ThrottledFiles(data, remote_mbps)
    inputs = {"local": "data:image/png;base64," + base64.b64encode(data).decode(), "remote": remote.url}
    results: dict = {}
    try:
        for config, overrides in CONFIGS.items():
            with tempfile.TemporaryDirectory() as scratch:
                root = Path(scratch)
                intervals = root / "intervals.jsonl"
                process, url = start(config, root / "data", step_s, size, intervals, root / "server.log")
                try:
                    with httpx.Client(timeout=600) as client:
                        runs = {}
                        for where, image_url in inputs.items():
                            for outputs in (1, 4):
                                body = {"prompt": "make it winter", "image_urls": [image_url], "num_images": outputs}
                                runs[f"{where} input, {outputs} output(s)"] = queue_run(
                                    client, url, body, requests, intervals
                                )
                        single = {}
                        # the reference inline (a data URI in the JSON body), or uploaded first as fal's clients
                        # upload files (fal-js does it for any Blob input) and sent as its URL on this server
                        for where, image_url in (("inline", inputs["local"]), ("uploaded", upload(client, url, data))):
                            body = {"prompt": "make it winter", "image_urls": [image_url], "num_images": 1}
                            single[where] = single_requests(client, url, body, repeats, intervals)
                finally:
                    process.terminate()
                    process.wait(timeout=60)
            results[config] = {"settings": overrides, "queue": runs, "single_request": single}
    finally:
        remote.close()
    after = results["after"]
    return {
        "benchmark": "GPU busy share: the model never waits for the CPU",
        "command": command("benchmarks.gpu_busy"),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_name(),
        # the machine's other work competes with the server for the CPU: its load average (1, 5, 15 min)
        "load_average": {"at_start": list(load_before), "at_end": list(os.getloadavg())},
        "workload": {
            "endpoint": FLASH,
            "steps": FLASH_STEPS,
            "step_s": step_s,
            "model_call_s": FLASH_STEPS * step_s,
            "requests_per_run": requests,
            "image_size": size,
            "reference": f"one {size}x{size} photo-like PNG ({len(data)} bytes)",
            "remote_input_mbps": remote_mbps,
            "output_format": "png",
            "queue_poll_interval_s": POLL_INTERVAL_S,
            "single_request_repeats": repeats,
        },
        "note": "The stand-in sleeps on the model thread (no CPU work), as the CPU is free while a GPU computes. "
        "The machine's other load counts against the server: a shared 2-core machine is a harsh place for this.",
        "results": results,
        "goals": GOALS,
        "goals_met": {
            "busy_share": min(r["busy_share"] for r in after["queue"].values()) >= GOALS["busy_share_min"],
            # end to end, as the caller sees it (its own JSON encoding included), and the server's part alone
            **{
                f"single_overhead_{where}{part}": single[f"{kind}share"] <= GOALS["single_overhead_share_max"]
                for where, single in after["single_request"].items()
                for part, kind in (("", "overhead_"), ("_server", "server_overhead_"))
            },
        },
    }


def markdown(report: dict) -> str:
    results = report["results"]
    rows = ["| workload | busy before | busy after |", "| --- | --- | --- |"]
    for name, after in results["after"]["queue"].items():
        before = results["before"]["queue"][name]
        rows.append(f"| {name} | {before['busy_share']:.1%} | {after['busy_share']:.1%} |")
    rows += [
        "",
        "| single sync request (idle server) | end to end | overhead | share | the server's part | share | where it goes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for where in results["after"]["single_request"]:
        for config in ("before", "after"):
            single = results[config]["single_request"][where]
            said = ", ".join(
                f"{name.replace('_', ' ')} {seconds * 1000:.0f} ms" for name, seconds in single["breakdown_s"].items()
            )
            rows.append(
                f"| reference {where}, {config} | {single['end_to_end_s']:.3f} s (model {single['model_s']:.3f} s) "
                f"| {single['overhead_s'] * 1000:.0f} ms | {single['overhead_share']:.1%} "
                f"| {single['server_overhead_s'] * 1000:.0f} ms | {single['server_overhead_share']:.1%} | {said} |"
            )
    work = report["workload"]
    head = (
        f"{report['benchmark']} — {report['device']}, load average {report['load_average']['at_end'][1]:.1f} "
        f"— `{report['command']}`\n\n"
        f"{work['requests_per_run']} flash requests per run, model call {work['model_call_s']:.2f} s "
        f"({work['steps']} steps × {work['step_s']} s), {work['image_size']}² PNG outputs; goals: ≥ "
        f"{report['goals']['busy_share_min']:.0%} busy, single-request overhead ≤ "
        f"{report['goals']['single_overhead_share_max']:.0%}; met: {report['goals_met']}"
    )
    return head + "\n\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--step-s", type=float, default=0.5, help="seconds per step (flash: 4 steps)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5, help="single sync requests (after a warm-up)")
    parser.add_argument("--remote-mbps", type=float, default=4.0, help="MB/s of the remote reference's server")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu-busy.json"))
    parser.add_argument("--serve", nargs=3, metavar=("PORT", "DATA_DIR", "STEP_S"), help=argparse.SUPPRESS)
    parser.add_argument("--intervals", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        port, data_dir, step_s = args.serve
        serve(int(port), Path(data_dir), float(step_s), args.size, args.intervals)
        return 0
    report = run(args.requests, args.step_s, args.size, args.repeats, args.remote_mbps)
    write(report, args.out, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
