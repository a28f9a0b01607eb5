"""Speed and memory of the server's pipeline against plain diffusers, side by side in one process and run.

    python -m benchmarks.speed --weights DIR            # real FLUX.2 [dev] weights (speed and quality)
    python -m benchmarks.speed --random-full-size       # the real architecture, random weights (speed only)
    python -m benchmarks.speed --tiny                   # the tiny model on the CPU: a smoke run of this script

Baseline: diffusers' `Flux2Pipeline` as its documentation runs it (bf16, PyTorch SDPA, no compile, no cache):
everything on the GPU where it fits, else `enable_model_cpu_offload()` (BFL's documented setup for 80 GB GPUs).
Then the server's pipeline (`pipelines.Flux2Editor`, the same call the server makes) on the same components,
set up as the options say (memory mode, quantization, attention backend, compile), for each endpoint profile,
each acceleration level (base edit only) and 1 and 4 references of `--ref-size` px, output `--size` px.

Reported per case: seconds per image (median of `--repeats` after a warm-up call), seconds per denoising step
(median interval between step callbacks, synchronised), peak GPU memory, the ratio to the baseline, and for
acceleration levels PSNR/SSIM against `none` on the same seed (meaningful with real weights only); model load
time (weights from disk to ready) for each side, and compile time (the warm-up call) when compiling. Writes JSON
and a markdown table (device, versions and the exact command included) to `--out` (default
benchmarks/results/speed-<device>-<source>.json).

Without real weights, `--random-full-size` builds FLUX.2 [dev]'s architecture at its real configuration with
random weights (see FULL_SIZE for where each number comes from): speed does not depend on weight values, and
the prompt is always padded to 512 tokens, so the tokenizer (the tiny model's) does not change the shapes.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from benchmarks.overhead import device_name as cpu_name
from benchmarks.overhead import reference_png, versions
from benchmarks.similarity import psnr as _psnr
from benchmarks.similarity import ssim

# FLUX.2 [dev]'s real configuration, for --random-full-size:
# - transformer: diffusers' scripts/convert_flux2_to_diffusers.py, get_flux2_transformer_config("flux2-dev")
#   (the script that made the diffusers layout of black-forest-labs/FLUX.2-dev); the same as
#   Flux2Transformer2DModel's defaults.
# - text encoder: transformers' Mistral3Config() defaults, documented as mistralai/Mistral-Small-3.1-24B-Instruct-2503
#   (text: 40 layers, hidden 5120, MLP 32768, 32 heads / 8 KV heads of 128, vocab 131072; Pixtral vision tower
#   24 layers of 1024); the conversion script loads Mistral-Small-3.2-24B-Instruct-2506, the same architecture.
# - VAE: AutoencoderKLFlux2() defaults (the conversion script builds the VAE with them before loading weights):
#   channels (128, 256, 512, 512), 2 layers per block, 32 latent channels, mid-block attention.
FULL_SIZE_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 128,
    "num_layers": 8,
    "num_single_layers": 48,
    "attention_head_dim": 128,
    "num_attention_heads": 48,
    "joint_attention_dim": 15360,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000,
    "eps": 1e-6,
}
GOALS = {  # the goals on an H100, 1024 px, one reference; ratios against plain diffusers in the same run
    "edit_none_speedup_min": 2.0,
    "edit_regular_speedup_min": 3.0,
    "edit_high_speedup_min": 4.0,
    "turbo_s_per_image_max": 3.0,
    "flash_s_per_image_max": 2.0,
    "load_s_max": 60.0,
}
PROMPT = "Turn the scene into a snowy winter evening, keep the composition"


def psnr(a: np.ndarray, b: np.ndarray) -> float | str:
    """PSNR in dB, or "inf" for identical images (JSON has no infinity)."""
    value = _psnr(a, b)
    return "inf" if value == float("inf") else value


def device_name() -> str:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"GPU: {props.name} ({props.total_memory / 1024**3:.0f} GiB) x{torch.cuda.device_count()}"
    return cpu_name()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 1024**3, 2) if torch.cuda.is_available() else None


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def build_random_full_size(tiny_dir: Path, dtype: torch.dtype) -> dict:
    """FLUX.2 [dev]'s components at full size with random weights, in CPU memory (built on the GPU, fast)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from pipelines.editor import load_tokenizer

    build_on = "cuda" if torch.cuda.is_available() else "cpu"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        components = {}
        for name, make in (
            ("text_encoder", lambda: Mistral3ForConditionalGeneration(Mistral3Config())),
            ("transformer", lambda: Flux2Transformer2DModel(**FULL_SIZE_TRANSFORMER)),
            ("vae", lambda: AutoencoderKLFlux2()),
        ):
            with torch.device(build_on):
                module = make()
            components[name] = module.to(device="cpu", dtype=dtype).eval()
            free_memory()
    finally:
        torch.set_default_dtype(previous)
    components["scheduler"] = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_dir, subfolder="scheduler")
    components["tokenizer"] = load_tokenizer(tiny_dir / "tokenizer")
    return components


@dataclass
class Case:
    profile: str
    references: int
    acceleration: str = "none"


def measure(run, repeats: int) -> dict:
    """Warm-up, then `repeats` timed calls of run(on_step) -> image; medians, peak memory, the last image."""
    run(lambda *_: None)
    sync()
    walls, steps, image = [], [], None
    reset_peak()
    for _ in range(repeats):
        marks = []

        def on_step(*_):
            sync()
            marks.append(time.perf_counter())

        started = time.perf_counter()
        image = run(on_step)
        sync()
        walls.append(time.perf_counter() - started)
        steps += [b - a for a, b in zip(marks, marks[1:])]
    return {
        "s_per_image": round(statistics.median(walls), 4),
        "s_per_step": round(statistics.median(steps), 4) if steps else None,
        "peak_gpu_gib": peak_gib(),
        "image": image,
    }


def run(args: argparse.Namespace) -> dict:
    from diffusers import Flux2Pipeline

    from pipelines import PROFILES, EditCall, Flux2Editor
    from pipelines.acceleration import Accelerator
    from pipelines.adapters import load_adapters
    from pipelines.editor import load_components, pick_dtype
    from pipelines.memory import module_sizes, resolve_plan
    from pipelines.runtime import Runtime, RuntimeOptions
    from server.cli import ensure_tiny

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = pick_dtype(device)
    tiny_dir = ensure_tiny()
    source = "weights" if args.weights else "random-full-size" if args.random_full_size else "tiny"

    started = time.perf_counter()
    if source == "random-full-size":
        components = build_random_full_size(tiny_dir, dtype)
        disk_load_s = None  # built in memory, nothing read from disk
    else:
        components = load_components(args.weights or tiny_dir, dtype)
        disk_load_s = time.perf_counter() - started
    build_s = time.perf_counter() - started
    sizes = module_sizes(components["transformer"], components["text_encoder"], components["vae"], dtype)

    ref = PIL.Image.open(io.BytesIO(reference_png(args.ref_size))).convert("RGB")
    refs = [ref.rotate(90 * i) for i in range(4)]
    cases = [Case(p, n) for p in args.profiles for n in args.references if p != "edit"]
    cases = [Case("edit", n, a) for n in args.references for a in args.acceleration] + cases

    def schedule(profile: str):
        return PROFILES[profile].schedule(args.steps if profile == "edit" else None)

    # 1. Plain diffusers, its defaults.
    baseline = {}
    baseline_info = {}
    if not args.no_baseline:
        placed = time.perf_counter()
        pipe = Flux2Pipeline(**components)
        pipe.set_progress_bar_config(disable=True)
        fits = not torch.cuda.is_available() or sizes.total + 10 * 1024**3 <= torch.cuda.mem_get_info()[0]
        if fits:
            pipe.to(device)
            baseline_info["placement"] = f"pipe.to({device.type!r})"
        else:
            pipe.enable_model_cpu_offload()
            baseline_info["placement"] = "pipe.enable_model_cpu_offload() (everything does not fit the GPU)"
        sync()
        baseline_info["load_s"] = None if disk_load_s is None else round(disk_load_s + time.perf_counter() - placed, 2)
        for case in {(c.profile, c.references) for c in cases}:
            steps, sigmas = schedule(case[0])

            def call(on_step, case=case, steps=steps, sigmas=sigmas):
                return pipe(
                    image=refs[: case[1]],
                    prompt=PROMPT,
                    height=args.size,
                    width=args.size,
                    num_inference_steps=steps,
                    sigmas=sigmas,
                    guidance_scale=2.5,
                    generator=torch.Generator("cpu").manual_seed(args.seed),
                    callback_on_step_end=lambda p, i, t, kw: on_step() or {},
                ).images[0]

            baseline[case] = measure(call, args.repeats)
            print(f"diffusers {case}: {baseline[case]['s_per_image']} s/image", flush=True)
        pipe.remove_all_hooks()
        del pipe
        for name in ("transformer", "text_encoder", "vae"):
            components[name].to("cpu")
        free_memory()

    # 2. The server's pipeline on the same components.
    options = RuntimeOptions(
        memory_mode=args.memory_mode,
        text_encoder_device=args.text_encoder_device,
        quantization=args.quantization,
        attention_backend=args.attention_backend,
        compile=args.compile,
        acceleration_regular=args.acceleration_regular,
        acceleration_high=args.acceleration_high,
    )
    placed = time.perf_counter()
    plan = resolve_plan(options.memory_mode, sizes, text_encoder_device=options.text_encoder_device,
                        quantization=options.quantization)
    runtime = Runtime(options, plan, sizes, Accelerator.from_settings(args.acceleration_regular, args.acceleration_high))
    pipe = Flux2Pipeline(**components)
    # the distilled turbo/flash adapter, loaded as the server loads it (none with random weights: those profiles
    # then run the base weights on their schedules, without the adapter's low-rank matmuls)
    adapters = load_adapters(pipe, args.weights or tiny_dir) if source != "random-full-size" else {}
    runtime.apply(pipe)
    pipe.set_progress_bar_config(disable=True)
    sync()
    load_s = None if disk_load_s is None else disk_load_s + time.perf_counter() - placed
    editor = Flux2Editor(pipe, args.weights or tiny_dir, load_s or 0.0, runtime, adapters)
    if args.compile:
        editor.warm_up()

    rows, images = [], {}
    for case in cases:
        def call(on_step, case=case):
            edit = EditCall(
                images=refs[: case.references], prompt=PROMPT, width=args.size, height=args.size,
                profile=case.profile, num_inference_steps=args.steps if case.profile == "edit" else None,
                seed=args.seed, acceleration=case.acceleration, on_step=on_step,
            )
            return editor.edit(edit).images[0]

        result = measure(call, args.repeats)
        images[(case.profile, case.references, case.acceleration)] = np.asarray(result.pop("image"))
        steps, _ = schedule(case.profile)
        row = {"profile": case.profile, "references": case.references, "acceleration": case.acceleration,
               "steps": steps, **result,
               "full_steps": steps - len(runtime.accelerator.skipped_steps(case.acceleration, steps) or [])}
        base = baseline.get((case.profile, case.references))
        if base:
            row["diffusers_s_per_image"] = base["s_per_image"]
            row["diffusers_peak_gpu_gib"] = base["peak_gpu_gib"]
            row["speedup_vs_diffusers"] = round(base["s_per_image"] / result["s_per_image"], 3)
            if case.acceleration == "none":
                theirs = np.asarray(base["image"])
                row["psnr_vs_diffusers"] = _round(psnr(images[(case.profile, case.references, "none")], theirs), 2)
                row["ssim_vs_diffusers"] = round(ssim(images[(case.profile, case.references, "none")], theirs), 4)
        if case.acceleration != "none":
            plain = images.get((case.profile, case.references, "none"))
            if plain is not None:
                mine = images[(case.profile, case.references, case.acceleration)]
                row["psnr_vs_none"] = _round(psnr(mine, plain), 2)
                row["ssim_vs_none"] = round(ssim(mine, plain), 4)
        rows.append(row)
        print(f"server {case}: {row['s_per_image']} s/image", flush=True)

    report = {
        "benchmark": "speed and memory: the server's pipeline against plain diffusers",
        "command": " ".join(["python", "-m", "benchmarks.speed", *args.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_name(),
        "versions": versions(),
        "source": source,
        "note": {
            "tiny": "Tiny random-weight FLUX.2 on the CPU: a smoke run of the benchmark's code, not a measurement "
            "of FLUX.2 [dev].",
            "random-full-size": "FLUX.2 [dev]'s real architecture and configuration with random weights: speed and "
            "memory do not depend on weight values; similarity figures (PSNR/SSIM) do and are meaningless here.",
            "weights": "Real FLUX.2 [dev] weights.",
        }[source],
        "workload": {
            "size": args.size, "reference_size": args.ref_size, "edit_steps": args.steps, "repeats": args.repeats,
            "statistic": "median after one warm-up call", "seed": args.seed, "dtype": str(dtype).removeprefix("torch."),
        },
        "weights_gib": {k: round(v / 1024**3, 2) for k, v in vars(sizes).items()},
        "build_or_load_s": round(build_s, 2),
        "diffusers": baseline_info,
        "server": {
            "load_s": None if load_s is None else round(load_s, 2),
            "compile_s": None if runtime.compile_seconds is None else round(runtime.compile_seconds, 2),
            **runtime.describe(),
            "acceleration": {k: (v.text if v else None) for k, v in runtime.accelerator.specs.items()},
        },
        "distilled_adapters": sorted(adapters),
        "results": rows,
    }
    report["goals"] = goals(report) if device.type == "cuda" and source != "tiny" else "not applicable: no GPU"
    return report


def _round(value, digits: int):
    return value if isinstance(value, str) else round(value, digits)


def goals(report: dict) -> dict:
    """Each goal of the issue that this run measured: the figure, the target, met or by how much it was missed."""
    out = {}

    def row(profile, acceleration, references=1):
        return next((r for r in report["results"] if (r["profile"], r["acceleration"], r["references"])
                     == (profile, acceleration, references)), None)

    for level in ("none", "regular", "high"):
        r = row("edit", level)
        if r and "speedup_vs_diffusers" in r:
            target = GOALS[f"edit_{level}_speedup_min"]
            out[f"edit_{level}_speedup"] = {"value": r["speedup_vs_diffusers"], "target_min": target,
                                            "met": r["speedup_vs_diffusers"] >= target}
    for profile in ("turbo", "flash"):
        r = row(profile, "none")
        if r:
            target = GOALS[f"{profile}_s_per_image_max"]
            out[f"{profile}_s_per_image"] = {"value": r["s_per_image"], "target_max": target,
                                             "met": r["s_per_image"] <= target}
    load = report["server"]["load_s"]
    if load is not None:
        out["load_s"] = {"value": load, "target_max": GOALS["load_s_max"], "met": load <= GOALS["load_s_max"]}
    return out


def markdown(report: dict) -> str:
    head = (
        f"{report['benchmark']} — {report['device']} — source: {report['source']} — "
        f"memory mode {report['server']['memory']['mode']}, quantization {report['server']['memory']['quantization']}"
        f" — `{report['command']}`\n\n{report['note']}\n\n"
        f"Load: server {report['server']['load_s']} s, diffusers {report['diffusers'].get('load_s')} s "
        f"({report['diffusers'].get('placement', 'no baseline')}); compile {report['server']['compile_s']} s.\n\n"
    )
    lines = [
        "| profile | refs | acceleration | steps (full) | s/image | s/step | peak GiB | diffusers s/image | "
        "diffusers peak GiB | speed-up | PSNR/SSIM vs none | PSNR/SSIM vs diffusers |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        def pair(p, s):
            return f"{r[p]} / {r[s]}" if p in r else ""
        lines.append(
            f"| {r['profile']} | {r['references']} | {r['acceleration']} | {r['steps']} ({r['full_steps']}) | "
            f"{r['s_per_image']} | {r['s_per_step']} | {r['peak_gpu_gib']} | {r.get('diffusers_s_per_image', '')} | "
            f"{r.get('diffusers_peak_gpu_gib', '')} | {r.get('speedup_vs_diffusers', '')} | "
            f"{pair('psnr_vs_none', 'ssim_vs_none')} | {pair('psnr_vs_diffusers', 'ssim_vs_diffusers')} |"
        )
    goals_text = json.dumps(report["goals"], indent=1) if isinstance(report["goals"], dict) else report["goals"]
    return head + "\n".join(lines) + f"\n\nGoals: {goals_text}\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", type=Path, help="FLUX.2 [dev] in diffusers layout")
    source.add_argument("--random-full-size", action="store_true", help="the real architecture, random weights")
    source.add_argument("--tiny", action="store_true", help="the tiny model (a CPU smoke run)")
    csv = lambda cast=str: lambda s: [cast(x) for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--profiles", type=csv(), default=["edit", "turbo", "flash"])
    parser.add_argument("--acceleration", type=csv(), default=["none", "regular", "high"])
    parser.add_argument("--references", type=csv(int), default=[1, 4])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--ref-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28, help="base edit steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--memory-mode", default="auto")
    parser.add_argument("--text-encoder-device")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--attention-backend")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--acceleration-regular", help="cache spec (pipelines.acceleration) for regular")
    parser.add_argument("--acceleration-high", help="cache spec for high")
    parser.add_argument("--no-baseline", action="store_true", help="skip plain diffusers (e.g. a second mode)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/speed-<device>-<source>.json)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    out = args.out
    if out is None:
        tag = "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0).split()[-1].lower()
        out = Path(f"benchmarks/results/speed-{tag}-{report['source']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
