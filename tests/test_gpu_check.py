"""benchmarks/gpu_check.py: its CPU smoke run (every section present, ok or unavailable with the reason) and its
time-boxing (a section that fails or overruns is recorded, and the next one still runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parent.parent
# Run the check as on the GPU machine: the server package and the web stack it depends on are absent there.
ABSENT_ON_GPU_MACHINE = """
import importlib.abc, runpy, sys
ABSENT = {"server", "pydantic", "pydantic_settings", "fastapi"}
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (absent on the GPU machine)", name=name)
sys.meta_path.insert(0, Absent())
runpy.run_module("benchmarks.gpu_check", run_name="__main__", alter_sys=True)
"""
# What a CPU can't run, and so must be recorded as unavailable (with a reason), not left out.
UNAVAILABLE_ON_CPU = {
    ("transformer_step", "1_ref/_native_cudnn"): "cuDNN attention needs CUDA",
    ("transformer_step", "4_ref/_native_cudnn"): "cuDNN attention needs CUDA",
    ("fp8_eager", "fp8"): "int8 weight-only stands in",
    ("fp8_compile", "fp8"): "int8 weight-only stands in",
    ("text_encoder", "host_to_device"): "need a CUDA device",
    ("end_to_end", "full_size_random"): "smoke run",
    ("memory_modes", "multi-gpu/none"): "refused by the server on a CPU",
    ("memory_modes", "offload-text-encoder/none"): "refused by the server on a CPU",
    ("memory_modes", "model-offload/none"): "refused by the server on a CPU",
    ("memory_modes", "group-offload/none"): "refused by the server on a CPU",
    ("memory_modes", "full/fp8"): "refused by the server on a CPU",
    ("memory_modes", "offload-text-encoder/fp8"): "refused by the server on a CPU",
    ("memory_modes", "offload-text-encoder/int4"): "refused by the server on a CPU",
    ("memory_modes", "group-offload/int8"): "refused by the server on a CPU",
}


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu-check") / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": str(out.parent / "inductor")}
    env.pop("OUT", None)
    result = subprocess.run(
        [sys.executable, "-c", ABSENT_ON_GPU_MACHINE, "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"written: {out}" in result.stdout and "| section | status |" in result.stdout
    return json.loads(out.read_text())


def test_smoke_run_reports_every_section_ok_or_unavailable_with_a_reason(smoke_report):
    report = smoke_report
    assert report["finished"] is True and report["mode"].startswith("smoke") and report["device"] == "cpu"
    assert list(report["sections"]) == [name for name, _ in gpu_check.SECTIONS]
    for name, section in report["sections"].items():
        assert section["status"] == "ok", (name, section)
        assert section["cases"], name
        for case, record in section["cases"].items():
            expected = UNAVAILABLE_ON_CPU.get((name, case))
            if expected:
                assert record["status"] == "unavailable" and expected in record["reason"], (name, case, record)
            else:
                assert record["status"] == "ok", (name, case, record)
    recorded = {(n, c) for n, s in report["sections"].items() for c in s["cases"]}
    assert set(UNAVAILABLE_ON_CPU) <= recorded  # not silently missing


def test_smoke_run_measures_what_each_section_is_for(smoke_report):
    sections = smoke_report["sections"]
    env = sections["environment"]
    assert env["torch"]["version"] and env["libraries"]["diffusers"] and env["gpu"] is None and env["why_no_gpu"]
    backends = env["cases"]["attention_backends"]["backends"]
    assert backends["native"]["status"] == "ok" and backends["native"]["ms_at_144"] > 0
    assert backends["_native_cudnn"]["status"] == "unavailable"
    assert all(b["status"] == "unavailable" for name, b in backends.items() if name.endswith("_hub"))

    memory = sections["memory_modes"]["cases"]
    assert memory["full/none"]["memory"]["mode"] == "full" and memory["full/none"]["edit_s"] > 0
    assert (
        memory["full/int8"]["memory"]["quantization"] == "int8" and "max_pixel_diff_vs_full_none" in memory["full/int8"]
    )

    step = sections["transformer_step"]["cases"]
    assert step["1_ref/native"]["tokens"] == 64 * 2 + 16 and step["4_ref/native"]["tokens"] == 64 * 5 + 16
    assert step["1_ref/native"]["median_s"] > 0 and step["1_ref/native"]["flop"] > 0

    lora = sections["lora"]["cases"]
    assert {"no_lora", "rank64", "rank256"} <= set(lora)
    assert lora["rank256"]["lora_parameters_m"] > lora["rank64"]["lora_parameters_m"] > 0
    assert lora["rank64"]["enabled"]["median_s"] > 0 and lora["rank64"]["disabled"]["median_s"] > 0

    assert sections["fp8_eager"]["quantization"] == "int8"  # the CPU stand-in for fp8
    assert 0 < sections["fp8_eager"]["cases"]["1_ref/int8"]["rel_diff_vs_bf16"] < 0.1
    compiled = sections["fp8_compile"]["cases"]
    assert compiled["1_ref/compiled"]["compile_s"] is not None and "recompile_s" in compiled["4_ref/compiled"]
    assert "eager" in sections["fp8_compile"]["compiler"]

    text = sections["text_encoder"]["cases"]
    assert text["31_layers"]["bit_identical"] is True and text["31_layers"]["max_abs_diff_vs_whole"] == 0.0

    assert sections["vae"]["cases"]["decode_64"]["median_s"] > 0
    tiny = sections["end_to_end"]["cases"]["tiny"]
    assert tiny["max_pixel_diff"] == 0  # the server's editor gives plain diffusers' pixels
    assert tiny["editor"]["median_s"] > 0 and tiny["diffusers"]["median_s"] > 0


def _check(tmp_path: Path, *extra: str) -> gpu_check.Check:
    return gpu_check.Check(gpu_check.parse_args(["--smoke", "--out", str(tmp_path / "c.json"), *extra]))


def test_a_failing_or_overrunning_section_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    # imported long ago (a long test session): a Check made in-process times itself from its own creation
    monkeypatch.setattr(gpu_check, "STARTED", time.monotonic() - 10_000)
    monkeypatch.setattr(gpu_check, "HARD_LIMIT_GRACE_S", 0.0)
    check = _check(tmp_path)

    def overruns(check, box, entry):
        entry["before"] = "kept"
        while True:  # past budget x HARD_LIMIT_FACTOR: interrupted
            time.sleep(0.01)

    def raises(check, box, entry):
        raise RuntimeError("boom")

    def one_case_fails(check, box, entry):
        check.case(entry, "good", box, lambda r: r.update(x=1))
        check.case(entry, "bad", box, lambda r: 1 / 0)
        check.case(entry, "cpu", box, lambda r: (_ for _ in ()).throw(gpu_check.Unavailable("needs CUDA")))

    def budget_spent(check, box, entry):
        check.case(entry, "first", box, lambda r: time.sleep(0.3))
        check.case(entry, "second", box, lambda r: r.update(ran=True))

    check.run_section("overruns", 0.2, overruns)
    monkeypatch.setattr(gpu_check, "HARD_LIMIT_GRACE_S", 5.0)
    check.run_section("raises", 5, raises)
    check.run_section("one_case_fails", 5, one_case_fails)
    check.run_section("budget_spent", 0.2, budget_spent)
    on_disk = json.loads((tmp_path / "c.json").read_text())["sections"]
    assert on_disk["overruns"]["status"] == "timeout" and on_disk["overruns"]["before"] == "kept"
    assert on_disk["raises"]["status"] == "error" and on_disk["raises"]["error"] == "RuntimeError: boom"
    assert "raise RuntimeError" in on_disk["raises"]["traceback"]
    cases = on_disk["one_case_fails"]["cases"]
    assert on_disk["one_case_fails"]["status"] == "errors"
    assert cases["good"] == {"status": "ok", "x": 1, "seconds": cases["good"]["seconds"]}
    assert cases["bad"]["status"] == "error" and "ZeroDivisionError" in cases["bad"]["error"]
    assert cases["cpu"] == {"status": "unavailable", "reason": "needs CUDA", "seconds": cases["cpu"]["seconds"]}
    assert on_disk["budget_spent"]["status"] == "partial"
    assert on_disk["budget_spent"]["cases"]["second"]["status"] == "skipped"


def test_a_library_error_at_load_is_a_failure_and_only_the_servers_refusal_is_a_refusal(tmp_path, monkeypatch):
    """offload-text-encoder's stacked group-offload hooks fail with a ValueError from diffusers: that is a finding,
    not the server refusing the mode."""
    import pipelines
    from pipelines.memory import MemoryModeError

    check, box, entry = _check(tmp_path), gpu_check.Box(60), {}

    def load_fails(error):
        def load_editor(*args, **kwargs):
            raise error

        return load_editor

    for name, error in (
        ("library", ValueError("Hook with name layer_execution_tracker already exists")),
        ("server", MemoryModeError("memory mode 'group-offload' needs a CUDA GPU")),
    ):
        monkeypatch.setattr(pipelines, "load_editor", load_fails(error))
        check.case(entry, name, box, lambda r: gpu_check._memory_case(check, tmp_path, "full", "none", {}, r))
    assert (
        entry["cases"]["library"]["status"] == "error"
        and "layer_execution_tracker" in entry["cases"]["library"]["error"]
    )
    assert entry["cases"]["server"] == {
        "status": "unavailable",  # on a CPU; `refused` on a GPU
        "reason": "refused by the server on a CPU: memory mode 'group-offload' needs a CUDA GPU",
        "seconds": entry["cases"]["server"]["seconds"],
    }


def test_no_section_starts_past_the_run_time_limit(tmp_path):
    check = _check(tmp_path, "--time-limit", "0")
    ran = []
    check.run_section("late", 10, lambda *a: ran.append(1))
    assert not ran
    section = json.loads((tmp_path / "c.json").read_text())["sections"]["late"]
    assert section["status"] == "skipped" and "time limit" in section["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_a_full_run_reports_the_environment_and_says_why_nothing_else_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "STARTED", time.monotonic() - 10_000)  # main() called in-process, not as a script
    out = tmp_path / "full.json"
    assert gpu_check.main(["--out", str(out), "--sections", "environment,transformer_step"]) == 0
    report = json.loads(out.read_text())
    environment, step = report["sections"]["environment"], report["sections"]["transformer_step"]
    assert environment["status"] == "unavailable" and environment["why_no_gpu"]
    assert "no CUDA device" in environment["cases"]["attention_backends"]["reason"]
    assert step == {"status": "unavailable", "reason": step["reason"]} and "--smoke" in step["reason"]


def test_default_output_goes_under_out_when_set(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.parse_args([]).out == tmp_path / "gpu_check.json"
    monkeypatch.delenv("OUT")
    assert gpu_check.parse_args(["--smoke"]).out == Path("benchmarks/results/gpu_check-smoke.json")
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--sections", "nope"])
