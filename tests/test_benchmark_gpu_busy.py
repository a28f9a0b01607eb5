"""The GPU-busy benchmark runs end to end (briefly: two requests a run, short steps, small images) and writes its
JSON and table. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys


def test_gpu_busy_benchmark_writes_its_report(tmp_path):
    out = tmp_path / "gpu-busy.json"
    command = [sys.executable, "-m", "benchmarks.gpu_busy", "--requests", "2", "--step-s", "0.02", "--size", "256"]
    ran = subprocess.run(
        [*command, "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=300, check=False
    )
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["command"].startswith("python -m benchmarks.gpu_busy") and report["device"].startswith("CPU")
    assert report["workload"]["model_call_s"] == 4 * 0.02
    workloads = {
        "local input, 1 output(s)",
        "local input, 4 output(s)",
        "remote input, 1 output(s)",
        "remote input, 4 output(s)",
    }
    for config in ("before", "after"):
        runs = report["results"][config]["queue"]
        assert set(runs) == workloads
        for run in runs.values():  # every request ran on the stand-in, once
            assert run["requests"] == 2 and 0 < run["busy_share"] <= 1 and run["model_busy_s"] > 0
        singles = report["results"][config]["single_request"]
        assert set(singles) == {"inline", "uploaded"}  # the reference in the body, or uploaded first
        for single in singles.values():
            assert single["end_to_end_s"] > single["model_s"] > 0
            assert single["overhead_s"] >= single["server_overhead_s"] > 0  # Server-Timing: the server's part
            parts = single["breakdown_s"]  # the overhead, split by the server's own timings
            assert set(parts) == {"fetch_inputs", "encode_and_store", "rest_of_the_server", "client_and_network"}
            assert parts["fetch_inputs"] > 0 and parts["encode_and_store"] > 0
    assert report["results"]["before"]["settings"]["FLUX2_PREFETCH_REQUESTS"] == "0"
    assert set(report["goals_met"]) == {
        "busy_share",
        "single_overhead_inline",
        "single_overhead_inline_server",
        "single_overhead_uploaded",
        "single_overhead_uploaded_server",
    }
    table = out.with_suffix(".md").read_text()
    assert "| local input, 4 output(s) |" in table and "| reference uploaded, after |" in table
