"""Cost and exactness of switching the distilled turbo adapter on one loaded FLUX.2: enable/disable vs fuse/unfuse.

    python -m benchmarks.adapters [--weights DIR] [--size PX] [--switches N] [--out FILE]

One pipeline, loaded once (the tiny model by default; `--weights` for FLUX.2 [dev] with
`loras/turbo/flux.2-turbo-lora.safetensors`, on CUDA when present). In order:

1. base output straight after load, before any adapter exists (the reference "fresh base load");
2. load the adapter (timed), unfused; turbo output (the reference "fresh adapter load");
3. N switches adapter on/off, each timed, each output compared with its reference (bit-exact or not);
4. per-step time of the transformer with the adapter disabled, enabled unfused, and fused (step times from
   `callback_on_step_end`, CUDA-synchronised);
5. fuse (timed) and unfuse (timed); turbo while fused and base after unfusing compared with their references
   (max abs pixel difference), and the base weights' drift after the fuse/unfuse round trip.

This is what `pipelines/adapters.py` chose from: unfused adapters, enabled per request. Writes JSON (device,
versions, exact command) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from benchmarks.overhead import device_name, reference_png, versions
from benchmarks.report import command, write
from pipelines.profiles import TURBO_SIGMAS

DRIFT_SAMPLE_LAYERS = 32


def gpu_name() -> str | None:
    return f"GPU: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else None


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(weights: Path | None, size: int, switches: int) -> dict:
    import io

    import PIL.Image

    from pipelines.adapters import load_adapters
    from pipelines.editor import load_components, pick_device, pick_dtype
    from server.cli import ensure_tiny

    weights = (weights or ensure_tiny()).resolve()
    device = pick_device()
    dtype = pick_dtype(device)
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline(**load_components(weights, dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)
    reference = PIL.Image.open(io.BytesIO(reference_png(min(size, 512)))).convert("RGB")
    step_times: list[float] = []

    def generate(sigmas=None, record_steps=False) -> np.ndarray:
        last = [0.0]

        def on_step(p, i, t, kwargs):
            sync()
            now = time.perf_counter()
            if record_steps:
                step_times.append(now - last[0])
            last[0] = now
            return {}

        sync()
        last[0] = time.perf_counter()
        out = pipe(
            image=[reference],
            prompt="Change the weather to winter",
            width=size,
            height=size,
            num_inference_steps=len(sigmas) if sigmas else 8,
            sigmas=list(sigmas) if sigmas else None,
            guidance_scale=2.5,
            generator=torch.Generator("cpu").manual_seed(1),
            callback_on_step_end=on_step,
            output_type="np",
        )
        return np.asarray(out.images)

    def step_median(sigmas) -> float:
        step_times.clear()
        generate(sigmas, record_steps=True)
        return statistics.median(step_times[1:] or step_times)  # the first step carries warm-up

    base_ref = generate()
    started = time.perf_counter()
    loaded = load_adapters(pipe, weights)
    load_s = time.perf_counter() - started
    if "turbo" not in loaded:
        raise SystemExit(f"no turbo adapter under {weights}/loras/turbo/")
    # A sample of adapted layers' base weights (all of them on the tiny model), to measure fuse/unfuse drift.
    adapted = [m.base_layer for m in pipe.transformer.modules() if hasattr(m, "base_layer")][:DRIFT_SAMPLE_LAYERS]
    base_weights = [(layer, layer.weight.detach().clone()) for layer in adapted]
    pipe.enable_lora()
    turbo_ref = generate(TURBO_SIGMAS)

    switch_s, exact = [], []
    for _ in range(switches):
        for enable, sigmas, ref in ((False, None, base_ref), (True, TURBO_SIGMAS, turbo_ref)):
            sync()
            started = time.perf_counter()
            pipe.enable_lora() if enable else pipe.disable_lora()
            sync()
            switch_s.append(time.perf_counter() - started)
            exact.append(bool(np.array_equal(generate(sigmas), ref)))

    pipe.disable_lora()
    step_base = step_median(TURBO_SIGMAS)
    pipe.enable_lora()
    step_unfused = step_median(TURBO_SIGMAS)
    sync()
    started = time.perf_counter()
    pipe.fuse_lora(adapter_names=["turbo"])
    sync()
    fuse_s = time.perf_counter() - started
    step_fused = step_median(TURBO_SIGMAS)
    fused_diff = float(np.abs(generate(TURBO_SIGMAS) - turbo_ref).max())
    sync()
    started = time.perf_counter()
    pipe.unfuse_lora()
    sync()
    unfuse_s = time.perf_counter() - started
    pipe.disable_lora()
    unfused_base_diff = float(np.abs(generate() - base_ref).max())
    drift = max(float((layer.weight.float() - before.float()).abs().max()) for layer, before in base_weights)

    results = {
        "adapter_load_s": load_s,
        "switch_enable_disable_median_s": statistics.median(switch_s),
        "switch_enable_disable_max_s": max(switch_s),
        "switches": len(switch_s),
        "switch_outputs_bit_exact": all(exact),
        "fuse_s": fuse_s,
        "unfuse_s": unfuse_s,
        "fused_turbo_max_abs_diff_vs_unfused": fused_diff,
        "base_after_fuse_unfuse_max_abs_diff": unfused_base_diff,
        "base_weights_max_drift_after_fuse_unfuse": drift,
        "drift_sampled_layers": len(base_weights),
        "step_base_s": step_base,
        "step_adapter_unfused_s": step_unfused,
        "step_adapter_fused_s": step_fused,
        "unfused_step_overhead": step_unfused / step_base - 1,
    }
    tiny = weights.joinpath("TINY_MODEL.json").is_file()
    return {
        "benchmark": "turbo adapter switching: enable/disable (unfused) vs fuse/unfuse",
        "command": command("benchmarks.adapters"),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": gpu_name() or device_name(),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": versions(),
        "workload": {"weights": "tiny model" if tiny else str(weights), "size": size, "steps": len(TURBO_SIGMAS)},
        "note": (
            "Tiny random-weight FLUX.2 on the CPU: switch and fuse costs scale with the number of adapted layers "
            "and their size, and per-step times with the model; re-run with --weights on a GPU for FLUX.2 [dev]. "
            "Exactness results carry over in kind (fp32 here; bf16 rounding is coarser)."
            if tiny
            else "FLUX.2 [dev] with fal's FLUX.2-dev-Turbo LoRA."
        ),
        "results": results,
    }


def markdown(report: dict) -> str:
    r = report["results"]
    drift = r["base_weights_max_drift_after_fuse_unfuse"]
    rows = [
        "| measure | enable/disable (unfused, chosen) | fuse/unfuse |",
        "| --- | --- | --- |",
        (
            f"| switch cost | median {r['switch_enable_disable_median_s'] * 1e3:.3f} ms "
            f"(max {r['switch_enable_disable_max_s'] * 1e3:.3f} ms, {r['switches']} switches) | "
            f"fuse {r['fuse_s'] * 1e3:.1f} ms + unfuse {r['unfuse_s'] * 1e3:.1f} ms |"
        ),
        f"| outputs equal fresh loads | {'yes, bit-exact' if r['switch_outputs_bit_exact'] else 'NO'} | "
        f"turbo max abs diff {r['fused_turbo_max_abs_diff_vs_unfused']:.2e}; base after unfuse "
        f"{r['base_after_fuse_unfuse_max_abs_diff']:.2e}"
        + f"; base weights drift {drift:.2e} ({r['drift_sampled_layers']} layers) |",
        (
            f"| time per turbo step | {r['step_adapter_unfused_s'] * 1e3:.1f} ms "
            f"({r['unfused_step_overhead']:+.1%} vs base {r['step_base_s'] * 1e3:.1f} ms) | "
            f"{r['step_adapter_fused_s'] * 1e3:.1f} ms |"
        ),
        f"| adapter load (once, at start-up) | {r['adapter_load_s']:.3f} s | |",
    ]
    head = f"{report['benchmark']} — {report['device']} ({report['dtype']}) — `{report['command']}`"
    return head + "\n\n" + "\n".join(rows) + "\n\n" + report["note"] + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="weights directory with loras/turbo/ (default: the tiny model)")
    parser.add_argument("--size", type=int, default=256, help="output side in px")
    parser.add_argument("--switches", type=int, default=10, help="on/off round trips")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/adapters-<cpu|gpu>.json")
    args = parser.parse_args(argv)
    report = run(args.weights, args.size, args.switches)
    out = args.out or Path(f"benchmarks/results/adapters-{'gpu' if torch.cuda.is_available() else 'cpu'}.json")
    write(report, out, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
