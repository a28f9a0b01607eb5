"""`flux2-server doctor`: what this machine has (GPU, driver, libraries, memory) and what the server would do."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import platform
import shutil
import subprocess
from pathlib import Path

GiB = 1024**3
LIBRARIES = ("torch", "torchvision", "diffusers", "transformers", "accelerate", "safetensors", "fastapi", "uvicorn")


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def nvidia_driver() -> str:
    """The NVIDIA kernel driver's version, from /proc or nvidia-smi; says so when there is none."""
    proc = Path("/proc/driver/nvidia/version")
    if proc.is_file():
        for word in proc.read_text().split():
            if word[:1].isdigit() and "." in word:
                return word
    if shutil.which("nvidia-smi"):
        answer = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        if answer.returncode == 0 and answer.stdout.strip():
            return answer.stdout.splitlines()[0].strip()
    return "none found (no /proc/driver/nvidia, no nvidia-smi)"


def host_memory() -> tuple[int, int] | None:
    """(available, total) bytes of system memory, from /proc/meminfo."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    values = {}
    for line in meminfo.read_text().splitlines():
        name, _, rest = line.partition(":")
        values[name] = int(rest.split()[0]) * 1024
    return values.get("MemAvailable", 0), values.get("MemTotal", 0)


def memory_mode(weights: Path | None, free_per_gpu: list[int], settings=None) -> list[tuple[str, str]]:
    """The memory mode `serve` would run with these settings (FLUX2_MEMORY_MODE, FLUX2_QUANTIZATION, ... or the
    flags), checked against this machine as `serve` checks it at start-up: the plan, or why it is refused. Where a
    mode is configured, also the one `auto` would pick."""
    if importlib.util.find_spec("pipelines.memory") is None:
        return [
            ("memory mode", "no memory-mode chooser in this build yet: the server puts every component on one device")
        ]
    if weights is None:
        return [
            ("memory mode", "pass --weights DIR to see the mode the server picks for those weights on this machine")
        ]
    from pipelines import memory
    from pipelines.editor import pick_device, pick_dtype
    from server.config import Settings

    settings = settings or Settings()
    dtype = pick_dtype(pick_device(settings.device), settings.dtype)
    sizes = memory.component_sizes(weights, dtype)

    def plan(mode: str, quantization: str) -> str:
        try:
            chosen = memory.resolve_plan(
                mode,
                sizes,
                device=settings.device,
                text_encoder_device=settings.text_encoder_device,
                quantization=quantization,
                reserve_bytes=int(settings.memory_reserve_gb * GiB),
                free_bytes_per_gpu=free_per_gpu,
            )
        except ValueError as exc:  # MemoryModeError and bad names: what `serve` would exit with
            return f"refused: {exc}"
        te = f", text encoder on {chosen.text_encoder_device}" if chosen.text_encoder_device else ""
        return f"{chosen.mode} on {chosen.device}{te} (quantization {chosen.quantization}): {chosen.reason}"

    configured = plan(settings.memory_mode, settings.quantization)
    automatic = plan("auto", "auto")
    rows = [
        ("weights size", ", ".join(f"{k} {v} GiB" for k, v in memory.describe_sizes(sizes).items()) + f" ({dtype})"),
        ("memory mode", f"[configured: {settings.memory_mode}, quantization {settings.quantization}] {configured}"),
    ]
    if automatic != configured:
        rows.append(("memory mode (auto)", f"[auto, quantization auto would pick] {automatic}"))
    return rows


def report(weights: Path | None, settings=None) -> list[tuple[str, str]]:
    import torch

    rows = [("python", platform.python_version()), ("platform", platform.platform())]
    rows += [(name, version(name)) for name in LIBRARIES]
    rows.append(("torch CUDA build", torch.version.cuda or "none (CPU build)"))
    rows.append(("NVIDIA driver", nvidia_driver()))
    free_per_gpu = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            free, total = torch.cuda.mem_get_info(index)
            free_per_gpu.append(free)
            rows.append(
                (
                    f"cuda:{index}",
                    f"{props.name}, compute {props.major}.{props.minor}, {free / GiB:.1f} GiB free of {total / GiB:.1f} GiB",
                )
            )
    else:
        rows.append(("GPU", "none visible to torch (torch.cuda.is_available() is False): the server runs on the CPU"))
    memory = host_memory()
    if memory:
        rows.append(("system memory", f"{memory[0] / GiB:.1f} GiB available of {memory[1] / GiB:.1f} GiB"))
    rows += memory_mode(weights, free_per_gpu, settings)
    if weights is not None:
        from weights.verify import verify

        checked = verify(weights)
        rows.append(("weights", f"{weights}: " + ("ok" if checked.ok else "; ".join(checked.problems))))
    return rows


def cmd_doctor(args: argparse.Namespace) -> int:
    from server.config import Settings

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and k != "weights" and v is not None}
    rows = report(args.weights, Settings(**overrides))  # FLUX2_* environment variables, overridden by the flags
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    # the weights it was given can't serve: a failure, for scripts as for people
    weights_ok = dict(rows).get("weights", "").endswith(": ok") if args.weights is not None else True
    return 0 if weights_ok else 1


def add_parser(commands: argparse._SubParsersAction) -> None:
    doctor = commands.add_parser("doctor", help="GPU, driver, library versions, free memory, the memory mode chosen")
    doctor.add_argument("--weights", type=Path, help="also check this weights directory and size the memory mode")
    # the same settings as `serve` (and FLUX2_* variables): the doctor answers for this configuration
    doctor.add_argument("--device", help="torch device, e.g. cuda:1 (default: CUDA when present, else CPU)")
    doctor.add_argument("--dtype", help="torch dtype, e.g. bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    doctor.add_argument(
        "--memory-mode", help="auto, full, multi-gpu, offload-text-encoder, model-offload, group-offload"
    )
    doctor.add_argument("--quantization", help="transformer weights: none, int8, fp8, int4, auto")
    doctor.add_argument("--text-encoder-device", help="e.g. cuda:1 (multi-gpu)")
    doctor.add_argument("--memory-reserve-gb", type=float, help="GPU memory kept for activations (default 10)")
    doctor.set_defaults(func=cmd_doctor)
