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


def memory_mode(weights: Path | None, free_per_gpu: list[int]) -> str:
    """The memory mode the server would choose, from the chooser in pipelines/ when this build has one."""
    if importlib.util.find_spec("pipelines.memory") is None:
        return "no memory-mode chooser in this build yet: the server puts every component on one device"
    from pipelines import memory

    if weights is None:
        return "pass --weights DIR to see the mode the chooser picks for those weights on this machine"
    import torch

    dtype = torch.bfloat16 if free_per_gpu else torch.float32
    plan = memory.choose_memory_mode(free_per_gpu, memory.component_sizes(weights, dtype))
    return f"{plan.mode} on {plan.device} (quantization {plan.quantization}): {plan.reason}"


def report(weights: Path | None) -> list[tuple[str, str]]:
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
    rows.append(("memory mode", memory_mode(weights, free_per_gpu)))
    if weights is not None:
        from weights.verify import verify

        checked = verify(weights)
        rows.append(("weights", f"{weights}: " + ("ok" if checked.ok else "; ".join(checked.problems))))
    return rows


def cmd_doctor(args: argparse.Namespace) -> int:
    rows = report(args.weights)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    doctor = commands.add_parser("doctor", help="GPU, driver, library versions, free memory, the memory mode chosen")
    doctor.add_argument("--weights", type=Path, help="also check this weights directory and size the memory mode")
    doctor.set_defaults(func=cmd_doctor)
