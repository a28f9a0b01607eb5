"""The CPU overhead benchmark runs end to end (briefly) and writes its JSON and table. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys


def test_overhead_benchmark_writes_its_report(tmp_path):
    out = tmp_path / "overhead.json"
    ran = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.overhead",
            "--repeats",
            "1",
            "--steps",
            "4",
            "--size",
            "512",
            "--status-polls",
            "20",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,  # the bound for this benchmark in CI
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    report = json.loads(out.read_text())
    assert report["device"].startswith("CPU") and report["command"].startswith("python")
    assert set(report["versions"]) == {"python", "torch", "diffusers", "transformers"}
    results = report["results"]
    for key in ("direct_pipeline_s", "sync_end_to_end_s", "queue_end_to_end_s", "status_p99_s"):
        assert results[key] > 0
    assert 0 < results["status_calls"] <= 20
    assert set(report["goals_met"]) == {"overhead_share", "status_p99"}
    assert "| HTTP queue |" in out.with_suffix(".md").read_text()
