"""Flash vs turbo: how close fewer-step schedules on the distilled turbo adapter come to turbo's 8 steps.

    python -m benchmarks.flash_quality --weights /models/FLUX.2-dev [--images DIR] [--seeds N] [--size PX] [--out FILE]

Meaningful only on real weights (FLUX.2 [dev] + `loras/turbo/flux.2-turbo-lora.safetensors`, on a GPU): the
tiny model's images are noise, so on it this only proves the script runs. For every reference image (PNG/JPEG
files in `--images`, else generated ones), prompt and seed, it runs turbo (8 steps, fal's sigmas) and each
candidate flash schedule on the same loaded model with the adapter enabled, and reports each candidate's PSNR
against turbo (mean, min) and its time per image. `pipelines/profiles.py: FLASH_SIGMAS` should be the
candidate with the best quality at the fewest steps; the current choice (every other turbo sigma, 4 steps) is
candidate `turbo[::2]`.

Writes JSON (device, versions, exact command, per-candidate figures) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from benchmarks.adapters import gpu_name, sync
from benchmarks.overhead import device_name, reference_png, versions
from benchmarks.report import command, write
from pipelines.profiles import FLASH_SIGMAS, TURBO_SIGMAS

T = TURBO_SIGMAS
CANDIDATES: dict[str, tuple[float, ...]] = {
    "turbo[::2] (current flash)": FLASH_SIGMAS,
    "1.0, t1, t3, t6": (T[0], T[1], T[3], T[6]),
    "1.0, t2, t5 (3 steps)": (T[0], T[2], T[5]),
    "1.0, t3 (2 steps)": (T[0], T[3]),
}
PROMPTS = (
    "Change the weather to a snowy winter day",
    "Make it a watercolor painting",
    "Replace the background with a city street at night",
)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def references(directory: Path | None, count: int) -> list[PIL.Image.Image]:
    if directory is None:
        import io

        return [PIL.Image.open(io.BytesIO(reference_png(512, seed=i))).convert("RGB") for i in range(count)]
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
    return [PIL.Image.open(p).convert("RGB") for p in files[:count]]


def run(weights: Path | None, images_dir: Path | None, n_images: int, n_prompts: int, seeds: int, size: int) -> dict:
    from pipelines.editor import load_editor
    from server.cli import ensure_tiny

    weights = (weights or ensure_tiny()).resolve()
    editor = load_editor(weights)
    if "turbo" not in editor.adapters.loaded:
        raise SystemExit(f"no turbo adapter under {weights}/loras/turbo/: flash quality needs the distilled weights")
    editor.adapters.use("turbo")

    def generate(image, prompt, seed, sigmas) -> tuple[np.ndarray, float]:
        sync()
        started = time.perf_counter()
        out = editor.pipe(
            image=[image],
            prompt=prompt,
            width=size,
            height=size,
            num_inference_steps=len(sigmas),
            sigmas=list(sigmas),
            guidance_scale=2.5,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pil",
        )
        sync()
        return np.asarray(out.images[0]), time.perf_counter() - started

    scores: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    seconds: dict[str, list[float]] = {name: [] for name in ("turbo", *CANDIDATES)}
    cases = 0
    for image in references(images_dir, n_images):
        for prompt in PROMPTS[:n_prompts]:
            for seed in range(seeds):
                turbo, took = generate(image, prompt, seed, TURBO_SIGMAS)
                seconds["turbo"].append(took)
                for name, sigmas in CANDIDATES.items():
                    candidate, took = generate(image, prompt, seed, sigmas)
                    seconds[name].append(took)
                    scores[name].append(psnr(candidate, turbo))
                cases += 1

    results = {
        name: {
            "sigmas": list(CANDIDATES[name]),
            "steps": len(CANDIDATES[name]),
            "psnr_vs_turbo_mean_db": statistics.mean(scores[name]),
            "psnr_vs_turbo_min_db": min(scores[name]),
            "seconds_per_image_median": statistics.median(seconds[name]),
        }
        for name in CANDIDATES
    }
    results["turbo"] = {
        "sigmas": list(TURBO_SIGMAS),
        "steps": 8,
        "seconds_per_image_median": statistics.median(seconds["turbo"]),
    }
    tiny = weights.joinpath("TINY_MODEL.json").is_file()
    return {
        "benchmark": "flash schedules vs turbo (PSNR against turbo's 8 steps, same model, seeds and inputs)",
        "command": command("benchmarks.flash_quality"),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": gpu_name() or device_name(),
        "versions": versions(),
        "workload": {
            "weights": "tiny model" if tiny else str(weights),
            "size": size,
            "cases": cases,
            "prompts": list(PROMPTS[:n_prompts]),
            "references": str(images_dir) if images_dir else f"{n_images} generated noise images",
        },
        "note": (
            "TINY random-weight model: images are noise, these PSNRs say nothing about quality; this run only "
            "shows the script works. Run with --weights on real FLUX.2 [dev] + turbo LoRA."
            if tiny
            else "FLUX.2 [dev] with fal's FLUX.2-dev-Turbo LoRA."
        ),
        "results": results,
    }


def markdown(report: dict) -> str:
    rows = ["| schedule | steps | PSNR vs turbo, mean (dB) | min (dB) | s / image |", "| --- | --- | --- | --- | --- |"]
    for name, r in report["results"].items():
        if name == "turbo":
            rows.append(f"| turbo (reference) | 8 | | | {r['seconds_per_image_median']:.2f} |")
        else:
            rows.append(
                f"| {name} | {r['steps']} | {r['psnr_vs_turbo_mean_db']:.2f} | {r['psnr_vs_turbo_min_db']:.2f} | "
                f"{r['seconds_per_image_median']:.2f} |"
            )
    head = f"{report['benchmark']} — {report['device']} — `{report['command']}`"
    return head + "\n\n" + "\n".join(rows) + "\n\n" + report["note"] + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="FLUX.2 [dev] with loras/turbo/ (default: the tiny model)")
    parser.add_argument("--images", type=Path, help="directory of reference images (default: generated ones)")
    parser.add_argument("--n-images", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the built-in prompts")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/flash-quality.json"))
    args = parser.parse_args(argv)
    report = run(args.weights, args.images, args.n_images, args.prompts, args.seeds, args.size)
    write(report, args.out, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
