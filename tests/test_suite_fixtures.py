"""What keeps the suite fast (README "How the suite stays fast"): torch on one thread in the tests and in every
process they start, and the shared tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from weights.verify import verify


def test_torch_runs_on_one_thread_here_and_in_the_processes_tests_start():
    threads = os.environ.get("OMP_NUM_THREADS")  # tests/conftest.py sets 1 unless the environment says otherwise
    assert threads is not None and torch.get_num_threads() == int(threads)
    code = "import os; print(os.environ.get('OMP_NUM_THREADS'))"  # servers and scripts inherit the environment
    started = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert started.stdout.strip() == threads


def test_xdist_workers_share_one_tiny_model(tmp_path):
    """Under `pytest -n`, each worker's `tiny_weights` is the same directory, built once under a file lock."""
    pytest.importorskip("xdist", reason="needs pytest-xdist (test extra)")
    for name in ("a", "b"):  # two files: `--dist loadfile` gives each its own worker
        (tmp_path / f"test_{name}.py").write_text(
            "import os\n\n"
            "def test_path(tiny_weights):\n"
            f"    (tiny_weights.parent.parent / '{name}.seen').write_text(f'{{tiny_weights}} {{os.getpid()}}')\n"
        )
    command = [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider"]
    command += ["-n", "2", "--dist", "loadfile", "--basetemp", str(tmp_path / "base"), str(tmp_path)]
    ran = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    (path_a, pid_a), (path_b, pid_b) = ((tmp_path / "base" / f"{name}.seen").read_text().split() for name in ("a", "b"))
    assert path_a == path_b and pid_a != pid_b and verify(Path(path_a)).ok
