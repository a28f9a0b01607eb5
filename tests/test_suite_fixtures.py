"""What keeps the suite fast (README "How the suite stays fast"): torch on one thread in the tests and in every
process they start, and the shared tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import torch

from tests.conftest import tiny_model_for
from weights.verify import verify


def test_torch_runs_on_one_thread_here_and_in_the_processes_tests_start():
    threads = os.environ.get("OMP_NUM_THREADS")  # tests/conftest.py sets 1 unless the environment says otherwise
    assert threads is not None and torch.get_num_threads() == int(threads)
    code = "import os; print(os.environ.get('OMP_NUM_THREADS'))"  # servers and scripts inherit the environment
    started = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert started.stdout.strip() == threads


def test_xdist_workers_share_one_tiny_model(tmp_path, monkeypatch):
    """Under `pytest -n`, every worker's `tiny_weights` is one directory of the run, built once (under a file lock:
    tests/test_cli.py has two builders at once)."""
    import weights.tiny

    real_build, builds = weights.tiny.build_tiny, []
    monkeypatch.setattr(weights.tiny, "build_tiny", lambda directory: builds.append(directory) or real_build(directory))
    workers = {
        name: SimpleNamespace(getbasetemp=lambda name=name: tmp_path / f"popen-{name}") for name in ("gw0", "gw1")
    }
    paths = {tiny_model_for(factory, name) for name, factory in workers.items()}
    assert (
        paths == {tmp_path / "tiny" / "FLUX.2-tiny"}
        and len(builds) == 1
        and verify(tmp_path / "tiny" / "FLUX.2-tiny").ok
    )
