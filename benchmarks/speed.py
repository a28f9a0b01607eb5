"""Speed and memory of the server's pipeline against plain diffusers, side by side in one process and run.

    python -m benchmarks.speed --weights DIR            # real FLUX.2 [dev] weights (speed and quality)
    python -m benchmarks.speed --random-full-size       # the real architecture, random weights (speed only)
    python -m benchmarks.speed --tiny                   # the tiny model on the CPU: a smoke run of this script
    ... --memory-mode full,offload-text-encoder,model-offload,group-offload --quantization none,fp8

Baseline: diffusers' `Flux2Pipeline` as its documentation runs it (bf16, PyTorch SDPA, no compile, no cache):
everything on the GPU where it fits, else `enable_model_cpu_offload()` (BFL's documented setup for 80 GB GPUs);
turbo and flash with the distilled LoRA loaded as its model card does (`pipe.load_lora_weights`, unfused), so
both sides run the same model on every profile. Then the server's pipeline (`pipelines.Flux2Editor`, the same
call the server makes) once per memory mode and quantization asked for (each on freshly loaded components; a
mode this machine can't run is reported refused with the server's reason), set up as the options say (attention
backend, compile), for each endpoint profile, each acceleration level (base edit only) and 1 and 4 references of
`--ref-size` px, output `--size` px.

Reported per case: seconds per image (median of `--repeats` after a warm-up call), seconds per denoising step
(median interval between step callbacks, synchronised), peak GPU memory, the ratio to the baseline, PSNR/SSIM
of each acceleration level against `none` on the same seed and of `none` against diffusers (exact where nothing
is quantized; the quantization's quality cost where something is) — meaningful with real weights only; model
load time (weights from disk to ready) for each side and each memory mode, and compile time (the warm-up call)
when compiling. Each of the issue's goals is reported as met or missed by how much. Writes JSON and a markdown
table (device, versions and the exact command included) to `--out` (default
benchmarks/results/speed-<device>-<source>.json).

Without real weights, `--random-full-size` builds FLUX.2 [dev]'s architecture at its real configuration with
random weights (see FULL_SIZE_TRANSFORMER for where each number comes from; the text encoder is Mistral3Config()'s
defaults, the real 24B one): speed doesn't depend on weight values, and the prompt is always padded to 512
tokens, so the tokenizer (the tiny model's) does not change the shapes.
"""

from __future__ import annotations

import argparse
import gc
import io
import itertools
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
NOTES = {
    "tiny": "Tiny random-weight FLUX.2 on the CPU: a smoke run of the benchmark's code, not a measurement of FLUX.2 "
    "[dev].",
    "random-full-size": "FLUX.2 [dev]'s real architecture and configuration with random weights. Speed doesn't depend "
    "on weight values, so the times and memory are FLUX.2 [dev]'s; similarity figures (PSNR/SSIM) do depend on them "
    "and are meaningless here.",
    "weights": "Real FLUX.2 [dev] weights.",
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
        marks: list[float] = []

        def on_step(*_, marks=marks):
            sync()
            marks.append(time.perf_counter())

        started = time.perf_counter()
        image = run(on_step)
        sync()
        walls.append(time.perf_counter() - started)
        steps += [b - a for a, b in itertools.pairwise(marks)]
    return {
        "s_per_image": round(statistics.median(walls), 4),
        "s_per_step": round(statistics.median(steps), 4) if steps else None,
        "peak_gpu_gib": peak_gib(),
        "image": image,
    }


def load_source(args: argparse.Namespace, source: str, tiny_dir: Path, dtype: torch.dtype) -> tuple[dict, float | None]:
    """Fresh components and the seconds they took from disk (None when built in memory)."""
    from pipelines.editor import load_components

    started = time.perf_counter()
    if source == "random-full-size":
        return build_random_full_size(tiny_dir, dtype), None  # built in memory, nothing read from disk
    components = load_components(args.weights or tiny_dir, dtype)
    return components, time.perf_counter() - started


def variants(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(memory mode, quantization) pairs to measure, unquantized first (quantizing changes the weights in place)."""
    quantizations = sorted(dict.fromkeys(args.quantization), key=lambda q: q != "none")
    return [(mode, quantization) for quantization in quantizations for mode in dict.fromkeys(args.memory_mode)]


def run(args: argparse.Namespace) -> dict:
    from diffusers import Flux2Pipeline

    from pipelines import PROFILES
    from pipelines.editor import pick_dtype
    from pipelines.memory import describe_sizes, module_sizes, resolve_plan
    from server.cli import ensure_tiny
    from weights.layout import ADAPTERS

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = pick_dtype(device)
    tiny_dir = ensure_tiny()
    source = "weights" if args.weights else "random-full-size" if args.random_full_size else "tiny"

    started = time.perf_counter()
    components, disk_load_s = load_source(args, source, tiny_dir, dtype)
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
        # base weights first; then the distilled profiles with their LoRA, loaded as its model card runs it in plain
        # diffusers (pipe.load_lora_weights, unfused), so both sides run the same model on every profile
        lora_loaded = set()
        for case in sorted({(c.profile, c.references) for c in cases}, key=lambda c: (bool(PROFILES[c[0]].adapter), c)):
            adapter = PROFILES[case[0]].adapter
            path = ADAPTERS[adapter].path(args.weights or tiny_dir) if adapter else None
            if path is not None and source != "random-full-size" and path.is_file():
                if adapter not in lora_loaded:
                    pipe.load_lora_weights(
                        path.parent, weight_name=path.name, adapter_name=adapter, local_files_only=True
                    )
                    lora_loaded.add(adapter)
                    baseline_info.setdefault("lora", {})[adapter] = f"pipe.load_lora_weights({path.name!r}), unfused"
                pipe.set_adapters([adapter])
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
        if lora_loaded:
            pipe.unload_lora_weights()  # the server variant loads its own, as the server does
        pipe.remove_all_hooks()
        del pipe
        for name in ("transformer", "text_encoder", "vae"):
            components[name].to("cpu")
        free_memory()

    # 2. The server's pipeline, once per memory mode and quantization asked for. The first variant runs on the
    # baseline's components; each later one on fresh ones (placement hooks and quantization change the modules).
    servers, rows, images = [], [], {}
    used = False
    for mode, quantization in variants(args):
        try:
            plan = resolve_plan(mode, sizes, text_encoder_device=args.text_encoder_device, quantization=quantization)
        except ValueError as exc:  # a mode or quantization this machine can't run: said, not measured
            servers.append({"memory_mode": mode, "quantization": quantization, "refused": str(exc)})
            print(f"server {mode}/{quantization}: refused: {exc}", flush=True)
            continue
        if used:
            components = None
            free_memory()
            components, disk_load_s = load_source(args, source, tiny_dir, dtype)
        used = True
        info, variant_rows = run_server(args, source, tiny_dir, components, disk_load_s, sizes, plan, cases, refs)
        components = None  # the variant's modules are placed/quantized: never reused
        free_memory()
        servers.append(info)
        for row, image in variant_rows:
            key = (row["memory_mode"], row["quantization"], row["profile"], row["references"])
            images[(*key, row["acceleration"])] = image
            base = baseline.get((row["profile"], row["references"]))
            if base:
                row["diffusers_s_per_image"] = base["s_per_image"]
                row["diffusers_peak_gpu_gib"] = base["peak_gpu_gib"]
                row["speedup_vs_diffusers"] = float(f"{base['s_per_image'] / row['s_per_image']:.4g}")
                if row["acceleration"] == "none":  # exactness of the server's path; with quantization, its cost
                    theirs = np.asarray(base["image"])
                    row["psnr_vs_diffusers"] = _round(psnr(image, theirs), 2)
                    row["ssim_vs_diffusers"] = round(ssim(image, theirs), 4)
            plain = images.get((*key, "none"))
            if row["acceleration"] != "none" and plain is not None:
                row["psnr_vs_none"] = _round(psnr(image, plain), 2)
                row["ssim_vs_none"] = round(ssim(image, plain), 4)
            rows.append(row)

    report = {
        "benchmark": "speed and memory: the server's pipeline against plain diffusers",
        "command": " ".join(["python", "-m", "benchmarks.speed", *args.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_name(),
        "versions": versions(),
        "source": source,
        "note": NOTES[source],
        "workload": {
            "size": args.size,
            "reference_size": args.ref_size,
            "edit_steps": args.steps,
            "repeats": args.repeats,
            "statistic": "median after one warm-up call",
            "seed": args.seed,
            "dtype": str(dtype).removeprefix("torch."),
        },
        "weights_gib": describe_sizes(sizes),
        "build_or_load_s": round(build_s, 2),
        "diffusers": baseline_info,
        "server": servers,
        "results": rows,
    }
    report["goals"] = goals(report) if device.type == "cuda" and source != "tiny" else "not applicable: no GPU"
    return report


def run_server(args, source, tiny_dir, components, disk_load_s, sizes, plan, cases, refs) -> tuple[dict, list]:
    """The server's pipeline (`Flux2Editor`, the server's call) placed as `plan` says; each case measured."""
    from diffusers import Flux2Pipeline

    from pipelines import PROFILES, EditCall, Flux2Editor
    from pipelines.acceleration import Accelerator
    from pipelines.adapters import load_adapters
    from pipelines.runtime import Runtime, RuntimeOptions

    options = RuntimeOptions(
        memory_mode=plan.mode,
        text_encoder_device=args.text_encoder_device,
        quantization=plan.quantization,
        attention_backend=args.attention_backend,
        compile=args.compile,
        acceleration_regular=args.acceleration_regular,
        acceleration_high=args.acceleration_high,
    )
    reset_peak()
    placed = time.perf_counter()
    runtime = Runtime(
        options, plan, sizes, Accelerator.from_settings(args.acceleration_regular, args.acceleration_high)
    )
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
    label = f"{plan.mode}/{plan.quantization}"

    rows = []
    for case in cases:

        def call(on_step, case=case):
            edit = EditCall(
                images=refs[: case.references],
                prompt=PROMPT,
                width=args.size,
                height=args.size,
                profile=case.profile,
                num_inference_steps=args.steps if case.profile == "edit" else None,
                seed=args.seed,
                acceleration=case.acceleration,
                on_step=on_step,
            )
            return editor.edit(edit).images[0]

        result = measure(call, args.repeats)
        image = np.asarray(result.pop("image"))
        steps, _ = PROFILES[case.profile].schedule(args.steps if case.profile == "edit" else None)
        skipped = runtime.accelerator.skipped_steps(case.acceleration, steps) or []
        row = {
            "memory_mode": plan.mode,
            "quantization": plan.quantization,
            "profile": case.profile,
            "references": case.references,
            "acceleration": case.acceleration,
            "steps": steps,
            **result,
            "full_steps": steps - len(skipped),
        }
        rows.append((row, image))
        print(f"server {label} {case}: {row['s_per_image']} s/image", flush=True)

    info = {
        "memory_mode": plan.mode,
        "quantization": plan.quantization,
        "load_s": None if load_s is None else round(load_s, 2),
        "compile_s": None if runtime.compile_seconds is None else round(runtime.compile_seconds, 2),
        **runtime.describe(),
        "acceleration": {k: (v.text if v else None) for k, v in runtime.accelerator.specs.items()},
        "distilled_adapters": sorted(adapters),
    }
    editor.pipe.remove_all_hooks()
    return info, rows


def _round(value, digits: int):
    return value if isinstance(value, str) else round(value, digits)


def goals(report: dict) -> dict:
    """Each goal of the issue that this run measured (1024 px, one reference): the best figure over the memory modes
    measured and which mode gave it, the target, and met or missed by how much."""
    out = {}

    def best(profile, acceleration, key, better):
        rows = [
            r
            for r in report["results"]
            if (r["profile"], r["acceleration"], r["references"]) == (profile, acceleration, 1) and key in r
        ]
        return better(rows, key=lambda r: r[key]) if rows else None

    def verdict(value, target, lower_is_better, where):
        met = value <= target if lower_is_better else value >= target
        entry = {"value": value, ("target_max" if lower_is_better else "target_min"): target, "met": met}
        if not met:
            entry["missed_by"] = round(value - target if lower_is_better else target - value, 3)
        return entry | {"memory": where}

    for level in ("none", "regular", "high"):
        r = best("edit", level, "speedup_vs_diffusers", max)
        if r:
            where = f"{r['memory_mode']}/{r['quantization']}"
            target = GOALS[f"edit_{level}_speedup_min"]
            out[f"edit_{level}_speedup"] = verdict(r["speedup_vs_diffusers"], target, False, where)
    for profile in ("turbo", "flash"):
        r = best(profile, "none", "s_per_image", min)
        if r:
            where = f"{r['memory_mode']}/{r['quantization']}"
            out[f"{profile}_s_per_image"] = verdict(r["s_per_image"], GOALS[f"{profile}_s_per_image_max"], True, where)
    for server in report["server"]:
        if server.get("load_s") is not None:
            where = f"{server['memory_mode']}/{server['quantization']}"
            out[f"load_s {where}"] = verdict(server["load_s"], GOALS["load_s_max"], True, where)
    return out


def markdown(report: dict) -> str:
    versions_text = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    head = (
        f"{report['benchmark']} — {report['device']} — source: {report['source']} — `{report['command']}`\n\n"
        f"{report['note']}\n\nVersions: {versions_text}. Workload: {json.dumps(report['workload'])}.\n\n"
        f"Plain diffusers: load {report['diffusers'].get('load_s')} s "
        f"({report['diffusers'].get('placement', 'no baseline')}); distilled profiles' LoRA: "
        f"{report['diffusers'].get('lora') or 'none (base weights on their schedules)'}.\n\n"
        "| server memory mode | quantization | device | load s | compile s | |\n| --- | --- | --- | --- | --- | --- |\n"
    )
    for server in report["server"]:
        if "refused" in server:
            head += f"| {server['memory_mode']} | {server['quantization']} | | | | refused: {server['refused']} |\n"
        else:
            head += (
                f"| {server['memory_mode']} | {server['quantization']} | {server['memory']['device']} | "
                f"{server['load_s']} | {server['compile_s']} | measured |\n"
            )
    lines = [
        (
            "| memory | profile | refs | acceleration | steps (full) | s/image | s/step | peak GiB | diffusers s/image |"
            " diffusers peak GiB | speed-up | PSNR/SSIM vs none | PSNR/SSIM vs diffusers |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:

        def pair(p, s, r=r):
            return f"{r[p]} / {r[s]}" if p in r else ""

        lines.append(
            f"| {r['memory_mode']}/{r['quantization']} | {r['profile']} | {r['references']} | {r['acceleration']} | "
            f"{r['steps']} ({r['full_steps']}) | {r['s_per_image']} | {r['s_per_step']} | {r['peak_gpu_gib']} | "
            f"{r.get('diffusers_s_per_image', '')} | {r.get('diffusers_peak_gpu_gib', '')} | "
            f"{r.get('speedup_vs_diffusers', '')} | {pair('psnr_vs_none', 'ssim_vs_none')} | "
            f"{pair('psnr_vs_diffusers', 'ssim_vs_diffusers')} |"
        )
    goals_text = json.dumps(report["goals"], indent=1) if isinstance(report["goals"], dict) else report["goals"]
    return head + "\n" + "\n".join(lines) + f"\n\nGoals: {goals_text}\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", type=Path, help="FLUX.2 [dev] in diffusers layout")
    source.add_argument("--random-full-size", action="store_true", help="the real architecture, random weights")
    source.add_argument("--tiny", action="store_true", help="the tiny model (a CPU smoke run)")
    csv = lambda cast=str: lambda s: [cast(x) for x in s.split(",") if x]
    parser.add_argument("--profiles", type=csv(), default=["edit", "turbo", "flash"])
    parser.add_argument("--acceleration", type=csv(), default=["none", "regular", "high"])
    parser.add_argument("--references", type=csv(int), default=[1, 4])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--ref-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28, help="base edit steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--memory-mode",
        type=csv(),
        default=["auto"],
        help="server memory modes to measure, comma-separated (e.g. full,offload-text-encoder,model-offload)",
    )
    parser.add_argument("--text-encoder-device")
    parser.add_argument(
        "--quantization",
        type=csv(),
        default=["none"],
        help="transformer quantizations to measure with each memory mode, comma-separated (e.g. none,fp8)",
    )
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
