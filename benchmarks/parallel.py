"""Several devices: what replicas and context parallel cost and buy, against one device, in the same run.

    python -m benchmarks.parallel [--weights DIR] [--devices N] [--steps S] [--size PX] [--jobs J] [--out FILE]

On the CPU (no GPU, or `--cpu`): the coordination overhead per denoising step of a context-parallel group of 2
rank processes (gloo; `pipelines.parallel`) against the same model in this process and against one rank process
alone (the process hop without any split), on the tiny model, where a step's compute is small so what is left is
the coordination: the all-to-alls of Ulysses, the agreed cancel flag and the progress message. Two ranks share the
machine's cores with each other, so this is no speed-up measurement.

With several GPUs: one GPU (a one-rank group on cuda:0) against (a) N replicas, one per GPU, each taking jobs from
one shared list: throughput in images/s for `--jobs` jobs; (b) one context-parallel group over the N GPUs: the
latency of one image. Both at `--size` with one reference of the same size. Without `--weights` the tiny model is
used and the GPU figures say nothing about FLUX.2 [dev] (its steps are too small to split).

Per-step time is the median gap between consecutive step callbacks after the first step (the first includes prompt
encoding); each figure is the median of `--repeats` calls after one warm-up call. Writes JSON (device, versions, the
exact command) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from benchmarks.overhead import device_name as cpu_name
from pipelines import EditCall, load_editor
from pipelines.parallel import GroupSpec, ProcessGroupEditor


def reference(size: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def make_call(args, stamps: list[float] | None = None, seed: int = 0) -> EditCall:
    on_step = (lambda step, total: stamps.append(time.perf_counter())) if stamps is not None else None
    return EditCall(
        images=[reference(args.size)],
        prompt="a lighthouse in winter",
        width=args.size,
        height=args.size,
        num_inference_steps=args.steps,
        seed=seed,
        on_step=on_step,
    )


def latency(editor, args) -> dict:
    """Median call and per-step seconds over `repeats` calls, after a warm-up call."""
    editor.edit(make_call(args))
    calls, steps = [], []
    for _ in range(args.repeats):
        stamps: list[float] = []
        started = time.perf_counter()
        editor.edit(make_call(args, stamps))
        calls.append(time.perf_counter() - started)
        steps += list(np.diff(stamps))
    return {"call_s": statistics.median(calls), "step_s": statistics.median(steps)}


def throughput(editors: list, args) -> dict:
    """`jobs` calls taken from one shared list by one thread per editor: images per second, after a warm-up each."""
    warm = [threading.Thread(target=e.edit, args=(make_call(args),)) for e in editors]
    for thread in warm:
        thread.start()
    for thread in warm:
        thread.join()
    jobs = list(range(args.jobs))
    lock = threading.Lock()
    done: list[int] = []

    def serve(editor) -> None:
        while True:
            with lock:
                if not jobs:
                    return
                seed = jobs.pop()
            editor.edit(make_call(args, seed=seed))
            done.append(seed)

    threads = [threading.Thread(target=serve, args=(e,)) for e in editors]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    assert sorted(done) == list(range(args.jobs)), "a job was lost or run twice"
    return {"jobs": args.jobs, "seconds": elapsed, "images_per_s": args.jobs / elapsed}


def group(weights: Path, devices: list[str], cpu_threads: int | None = None) -> ProcessGroupEditor:
    editor = ProcessGroupEditor(GroupSpec(str(weights), devices, cpu_threads=cpu_threads))
    editor.wait_ready()
    return editor


def run_cpu(weights: Path, args) -> dict:
    threads = max(1, (os.cpu_count() or 2) // 2)  # what each of 2 CPU ranks gets: every run gets the same
    torch.set_num_threads(threads)
    results = {"in_process": latency(load_editor(weights, device="cpu"), args)}
    for name, devices in (("one_rank_process", ["cpu"]), ("context_parallel_2", ["cpu", "cpu"])):
        editor = group(weights, devices, threads)
        try:
            results[name] = latency(editor, args)
        finally:
            editor.stop()
    base = results["one_rank_process"]["step_s"]
    results["overhead_per_step_s"] = {
        "process_hop": base - results["in_process"]["step_s"],
        "context_parallel_2_vs_one_rank": results["context_parallel_2"]["step_s"] - base,
    }
    return results


def run_gpus(weights: Path, args, devices: list[str]) -> dict:
    """One device against replicas on `devices` and a context-parallel group over them (CUDA devices; CPU "devices"
    in the test that runs this code without a GPU)."""
    results: dict = {}
    one = group(weights, devices[:1])
    try:
        results["one_gpu"] = latency(one, args)
        results["one_gpu_throughput"] = throughput([one], args)
    finally:
        one.stop()
    replicas = [group(weights, [device]) for device in devices]
    try:
        results["replicas_throughput"] = throughput(replicas, args)
    finally:
        for editor in replicas:
            editor.stop()
    split = group(weights, devices)
    try:
        results["context_parallel_latency"] = latency(split, args)
    finally:
        split.stop()
    results["replicas_speedup"] = (
        results["replicas_throughput"]["images_per_s"] / results["one_gpu_throughput"]["images_per_s"]
    )
    results["context_parallel_speedup"] = results["one_gpu"]["call_s"] / results["context_parallel_latency"]["call_s"]
    return results


def table(report: dict) -> str:
    r = report["results"]
    if report["mode"] == "cpu":
        rows = [
            "| run | call (s) | per step (s) |",
            "| --- | --- | --- |",
            *(
                f"| {name} | {r[name]['call_s']:.3f} | {r[name]['step_s']:.4f} |"
                for name in ("in_process", "one_rank_process", "context_parallel_2")
            ),
            "",
            (
                f"Coordination overhead per step: process hop {r['overhead_per_step_s']['process_hop'] * 1000:.1f} ms, "
                f"context parallel (2 ranks) over one rank "
                f"{r['overhead_per_step_s']['context_parallel_2_vs_one_rank'] * 1000:.1f} ms."
            ),
        ]
        return "\n".join(rows)
    n = report["workload"]["devices"]
    return "\n".join(
        [
            "| run | figure | vs one GPU |",
            "| --- | --- | --- |",
            (
                f"| one GPU | {r['one_gpu']['call_s']:.3f} s/image, {r['one_gpu_throughput']['images_per_s']:.3f} "
                "images/s | 1.00x |"
            ),
            f"| {n} replicas | {r['replicas_throughput']['images_per_s']:.3f} images/s | {r['replicas_speedup']:.2f}x |",
            (
                f"| context parallel over {n} | {r['context_parallel_latency']['call_s']:.3f} s/image | "
                f"{r['context_parallel_speedup']:.2f}x |"
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="a FLUX.2 diffusers directory (default: the tiny model)")
    parser.add_argument("--cpu", action="store_true", help="the CPU measurement even where GPUs are present")
    parser.add_argument("--devices", type=int, help="GPUs to use (default: every visible one)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="output and reference size (px)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=16, help="jobs for the throughput runs (GPUs)")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mode = "cpu" if args.cpu or gpus < 2 else "gpus"
    args.devices = args.devices or gpus
    with tempfile.TemporaryDirectory() as scratch:
        weights = args.weights
        if weights is None:
            from weights.tiny import build_tiny

            weights = build_tiny(Path(scratch) / "tiny")
        if mode == "cpu":
            results = run_cpu(weights, args)
        else:
            results = run_gpus(weights, args, [f"cuda:{i}" for i in range(args.devices)])
    device = torch.cuda.get_device_name(0) if mode == "gpus" else cpu_name()
    report = {
        "benchmark": "replicas and context parallel against one device",
        "command": "python -m benchmarks.parallel " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "device": device,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
        },
        "workload": {
            "weights": str(args.weights) if args.weights else "tiny random-weight FLUX.2",
            "steps": args.steps,
            "size": args.size,
            "references": 1,
            "repeats": args.repeats,
            "devices": args.devices if mode == "gpus" else 2,
            "cpu_threads_per_process": max(1, (os.cpu_count() or 2) // 2) if mode == "cpu" else None,
            "statistic": "median",
        },
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
