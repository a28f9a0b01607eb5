"""The adapter-switching and flash-quality benchmarks run end to end (briefly, tiny model). No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys


def run_benchmark(module: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", module, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def test_adapters_benchmark_measures_switching_and_exactness(tmp_path):
    out = tmp_path / "adapters.json"
    ran = run_benchmark("benchmarks.adapters", "--size", "64", "--switches", "2", "--out", str(out))
    assert ran.returncode == 0, ran.stderr
    report = json.loads(out.read_text())
    assert report["device"].startswith("CPU") and report["command"].startswith("python")
    r = report["results"]
    assert r["switches"] == 4 and r["switch_outputs_bit_exact"] is True
    assert r["switch_enable_disable_median_s"] > 0 and r["fuse_s"] > 0 and r["unfuse_s"] > 0
    assert r["drift_sampled_layers"] > 0
    assert "| switch cost |" in out.with_suffix(".md").read_text()


def test_flash_quality_benchmark_runs_and_says_tiny_results_mean_nothing(tmp_path):
    out = tmp_path / "flash.json"
    ran = run_benchmark(
        "benchmarks.flash_quality",
        "--n-images",
        "1",
        "--prompts",
        "1",
        "--seeds",
        "1",
        "--size",
        "64",
        "--out",
        str(out),
    )
    assert ran.returncode == 0, ran.stderr
    report = json.loads(out.read_text())
    assert report["workload"]["cases"] == 1
    assert "say nothing about quality" in report["note"]
    current = report["results"]["turbo[::2] (current flash)"]
    assert current["sigmas"] == [1.0, 0.4374, 0.1893, 0.0495] and current["psnr_vs_turbo_mean_db"] > 0
