"""benchmarks/parallel.py: its several-GPU code run on two CPU "devices", and its tables."""

import argparse
import json
from pathlib import Path

import pytest

from benchmarks.parallel import run_gpus, table

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cpu-parallel.json"


@pytest.mark.multiprocess
def test_replicas_and_context_parallel_against_one_device(tiny_weights):
    args = argparse.Namespace(steps=4, size=64, repeats=1, jobs=4)
    results = run_gpus(tiny_weights, args, ["cpu", "cpu"])
    assert results["replicas_throughput"]["jobs"] == 4  # every job ran once (checked inside)
    assert results["replicas_speedup"] > 0 and results["context_parallel_speedup"] > 0
    report = {"mode": "gpus", "workload": {"devices": 2}, "results": results}
    assert "| 2 replicas |" in table(report) and "| context parallel over 2 |" in table(report)


def test_the_committed_cpu_result_has_its_command_and_reads_as_a_table():
    report = json.loads(RESULTS.read_text())
    assert report["command"].startswith("python -m benchmarks.parallel")
    assert report["mode"] == "cpu"
    assert "Coordination overhead per step" in table(report)
