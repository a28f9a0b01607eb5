"""What this machine offers torch: the NVIDIA driver, the CUDA build of torch, and the silent CPU fallback refused.

With a CUDA build of torch and a driver too old for it, `torch.cuda.is_available()` is simply False: the server
would then load the full FLUX.2 [dev] in fp32 (~210 GB) into host memory and run for hours per image. So full-size
weights on the CPU are refused unless FLUX2_ALLOW_CPU says otherwise, with the driver and torch's CUDA version in
the message (`check_cpu_fallback`). Used by `pipelines.runtime` at start-up and by `flux2-server doctor`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch

GiB = 1024**3
CPU_WEIGHTS_LIMIT_BYTES = 8 * GiB  # weights (at the load dtype) above this are "full size": refused on the CPU
# The oldest Linux driver each CUDA major version of torch runs on (NVIDIA's CUDA compatibility table).
MINIMUM_DRIVER = {"13": "580", "12": "525", "11": "450"}


class CPUFallbackError(ValueError):
    """Full-size weights would be loaded for the CPU without being allowed to."""


def nvidia_driver() -> str | None:
    """The NVIDIA kernel driver's version, from /proc or nvidia-smi; None when there is none."""
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
    return None


def describe_driver(driver: str | None) -> str:
    return driver or "none found (no /proc/driver/nvidia, no nvidia-smi)"


def describe_torch_cuda() -> str:
    """torch's CUDA build and the driver it needs, e.g. "13.0 (needs NVIDIA driver >= 580)"."""
    cuda = torch.version.cuda
    if not cuda:
        return "none (CPU build of torch)"
    minimum = MINIMUM_DRIVER.get(cuda.split(".")[0])
    return f"{cuda} (needs NVIDIA driver >= {minimum})" if minimum else cuda


def cpu_fallback_problem(weights_bytes: int, allow_cpu: bool, driver: str | None = None) -> str | None:
    """Why loading `weights_bytes` of weights for the CPU is refused, or None where it may go ahead.

    Called where the plan's device is the CPU. The tiny model (kilobytes) always runs; full-size weights only
    with `allow_cpu`. The message says why CUDA may be missing: torch's CUDA build and the NVIDIA driver.
    """
    if allow_cpu or weights_bytes <= CPU_WEIGHTS_LIMIT_BYTES:
        return None
    cuda = torch.version.cuda
    if cuda and driver:
        why = (
            f"torch {torch.__version__} is built for CUDA {describe_torch_cuda()} and the NVIDIA driver is {driver}: "
            "a driver older than the build needs makes torch see no GPU; install a torch build for this driver "
            "(see README, 'GPU') or a newer driver"
        )
    elif cuda:
        why = (
            f"torch {torch.__version__} is built for CUDA {describe_torch_cuda()}, and no NVIDIA driver was found "
            "(no /proc/driver/nvidia, no nvidia-smi): in a container, run it with the GPU (docker --gpus all)"
        )
    else:
        why = f"torch {torch.__version__} is a CPU build: install a CUDA build of torch for the GPU"
    return (
        f"refusing to load {weights_bytes / GiB:.1f} GiB of weights for the CPU: torch sees no CUDA GPU "
        f"(torch.cuda.is_available() is False). {why}. To run on the CPU anyway (hours per image, that much host "
        "memory), set FLUX2_ALLOW_CPU=1 (--allow-cpu)."
    )


def check_cpu_fallback(device: str, weights_bytes: int, allow_cpu: bool) -> None:
    """Raise CPUFallbackError where `device` is the CPU and `cpu_fallback_problem` says no."""
    if torch.device(device).type != "cpu":
        return
    problem = cpu_fallback_problem(weights_bytes, allow_cpu, nvidia_driver())
    if problem:
        raise CPUFallbackError(problem)
