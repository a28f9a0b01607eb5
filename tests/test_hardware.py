"""The silent CPU fallback refused (pipelines.hardware): a CUDA build of torch with a driver too old for it sees no
GPU, and full-size weights would go to host memory. Shown with weights whose safetensors headers claim full size
(a sparse file: the header says 6 GiB of bf16, the disk holds none of it) and torch's CUDA answers simulated."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from pipelines import hardware
from pipelines.hardware import CPU_WEIGHTS_LIMIT_BYTES, CPUFallbackError, cpu_fallback_problem

GiB = 1024**3


@pytest.fixture(scope="module")
def big_weights(tiny_weights, tmp_path_factory):
    """The tiny model plus a 3 x 2^30 bf16 tensor in the transformer's directory: 12 GiB at the CPU's fp32."""
    directory = tmp_path_factory.mktemp("big") / "FLUX.2-big"
    shutil.copytree(tiny_weights, directory)
    n = 3 * 2**30
    header = json.dumps({"big": {"dtype": "BF16", "shape": [n], "data_offsets": [0, 2 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    path = directory / "transformer" / "extra.safetensors"
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 2 * n)  # sparse: no data written
    return directory


@pytest.fixture
def cuda_13_old_driver(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(hardware, "nvidia_driver", lambda: "550.54.15")


def test_the_message_names_the_driver_and_torchs_cuda(cuda_13_old_driver):
    problem = cpu_fallback_problem(12 * GiB, allow_cpu=False, driver="550.54.15")
    assert problem.startswith("refusing to load 12.0 GiB of weights for the CPU: torch sees no CUDA GPU")
    assert "CUDA 13.0 (needs NVIDIA driver >= 580) and the NVIDIA driver is 550.54.15" in problem
    assert "FLUX2_ALLOW_CPU=1" in problem
    assert "no NVIDIA driver was found" in cpu_fallback_problem(12 * GiB, allow_cpu=False, driver=None)


def test_allowed_or_small_weights_run_on_the_cpu(cuda_13_old_driver):
    assert cpu_fallback_problem(12 * GiB, allow_cpu=True) is None
    assert cpu_fallback_problem(CPU_WEIGHTS_LIMIT_BYTES, allow_cpu=False) is None  # the limit itself is allowed
    hardware.check_cpu_fallback("cuda:0", 200 * GiB, allow_cpu=False)  # a GPU plan: not this check's business


def test_a_cpu_build_of_torch_says_so(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "is a CPU build" in cpu_fallback_problem(12 * GiB, allow_cpu=False)


def test_load_editor_refuses_full_size_weights_before_loading_them(big_weights, cuda_13_old_driver):
    from pipelines import load_editor
    from pipelines.runtime import RuntimeOptions, plan_runtime

    with pytest.raises(CPUFallbackError, match=r"refusing to load 12\.\d GiB .* CUDA 13\.0 .* 550\.54\.15"):
        load_editor(big_weights)
    from pipelines import memory

    roomy = lambda: (512 * memory.GiB, 512 * memory.GiB)  # allowed, the host RAM check still applies: give it room
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(memory, "host_memory", roomy)
        allowed = plan_runtime(RuntimeOptions(allow_cpu=True), big_weights, None, torch.float32)
    assert allowed.plan.device == "cpu"


def test_the_tiny_model_needs_no_permission(tiny_weights, cuda_13_old_driver):
    from pipelines.runtime import RuntimeOptions, plan_runtime

    assert plan_runtime(RuntimeOptions(), tiny_weights, None, torch.float32).plan.device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_serve_refuses_and_doctor_says_why(big_weights, tmp_path):
    env = dict(os.environ)
    serve = [sys.executable, "-m", "server.cli", "serve", "--weights", str(big_weights), "--data-dir", str(tmp_path)]
    ran = subprocess.run(serve, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert ran.returncode == 2
    assert "error: refusing to load 12." in ran.stderr and "FLUX2_ALLOW_CPU=1" in ran.stderr

    doctor = [sys.executable, "-m", "server.cli", "doctor", "--weights", str(big_weights)]
    ran = subprocess.run(doctor, env=env, capture_output=True, text=True, timeout=120, check=False)
    lines = ran.stdout.splitlines()
    assert any(line.startswith("on the CPU") and "refused: refusing to load 12." in line for line in lines)
    assert any(line.startswith("torch CUDA build") for line in lines)
