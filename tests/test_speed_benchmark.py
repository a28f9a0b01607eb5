"""benchmarks/speed.py on the tiny model (its CPU smoke run) and benchmarks/similarity.py's measures.

The speed figures themselves are not asserted (speed goals are the benchmark's, on a GPU); what is checked is that
one run measures every case side by side with plain diffusers and reports it consistently, and that acceleration
`none` gives plain diffusers' pixels exactly.
"""

from __future__ import annotations

import json
import math

import numpy as np

from benchmarks import speed
from benchmarks.similarity import psnr, ssim


def test_psnr_and_ssim_on_known_cases():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert psnr(a, a) == math.inf and ssim(a, a) == 1.0
    b = a.astype(np.int16) + 1
    b[b > 255] = 254  # every pixel off by exactly 1: MSE 1
    assert abs(psnr(a, b.astype(np.uint8)) - 20 * math.log10(255)) < 1e-9
    noisy = np.clip(a + rng.normal(0, 40, a.shape), 0, 255).astype(np.uint8)
    assert 0 < ssim(a, noisy) < 0.9 and psnr(a, noisy) < psnr(a, b.astype(np.uint8))


def test_speed_benchmark_runs_every_case_against_diffusers_on_the_tiny_model(tmp_path):
    out = tmp_path / "speed.json"
    argv = ["--tiny", "--size", "256", "--ref-size", "128", "--steps", "8", "--repeats", "1", "--out", str(out)]
    argv += ["--memory-mode", "full,group-offload", "--quantization", "none,int8"]
    assert speed.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["source"] == "tiny" and "smoke run" in report["note"]
    assert report["command"] == "python -m benchmarks.speed " + " ".join(argv)
    assert report["goals"] == "not applicable: no GPU" and report["device"].startswith("CPU")
    assert set(report["versions"]) >= {"torch", "diffusers", "transformers"}
    assert report["diffusers"]["placement"] == "pipe.to('cpu')" and report["diffusers"]["load_s"] > 0
    assert report["diffusers"]["lora"] == {"turbo": "pipe.load_lora_weights('flux.2-turbo-lora.safetensors'), unfused"}

    # every mode and quantization asked for: measured, or refused with serve's reason (no CUDA here)
    servers = {(s["memory_mode"], s["quantization"]): s for s in report["server"]}
    assert list(servers) == [("full", "none"), ("group-offload", "none"), ("full", "int8"), ("group-offload", "int8")]
    for quantization in ("none", "int8"):
        measured = servers[("full", quantization)]
        assert measured["memory"]["mode"] == "full" and measured["memory"]["quantization"] == quantization
        assert measured["load_s"] > 0 and measured["compile_s"] is None  # no --compile
        assert measured["distilled_adapters"] == ["turbo"]  # the tiny build's LoRA, loaded as the server loads it
        assert "needs a CUDA GPU" in servers[("group-offload", quantization)]["refused"]

    cases = {(r["profile"], r["references"], r["acceleration"]) for r in report["results"]}
    assert cases == {("edit", n, a) for n in (1, 4) for a in ("none", "regular", "high")} | {
        (p, n, "none") for p in ("turbo", "flash") for n in (1, 4)
    }
    assert len(report["results"]) == 2 * len(cases)  # once per measured variant
    for r in report["results"]:
        assert r["s_per_image"] > 0 and r["s_per_step"] > 0 and r["diffusers_s_per_image"] > 0
        assert r["s_per_step"] < r["s_per_image"] and r["peak_gpu_gib"] is None  # no GPU, no GPU memory figure
        assert math.isclose(r["speedup_vs_diffusers"], r["diffusers_s_per_image"] / r["s_per_image"], rel_tol=1e-3)
        if r["acceleration"] == "none":
            assert r["full_steps"] == r["steps"]
            if r["quantization"] == "none":
                # bit parity: plain diffusers' pixels (turbo and flash: diffusers with the LoRA loaded, unfused)
                assert r["psnr_vs_diffusers"] == "inf" and r["ssim_vs_diffusers"] == 1.0
                assert r["steps"] == {"edit": 8, "turbo": 8, "flash": 4}[r["profile"]]
            if r["quantization"] == "int8":  # the quantization's cost against plain diffusers in bf16/fp32
                # (small: only the blocks' layers are quantized, so SSIM may round to 1.0; PSNR is finite)
                assert r["psnr_vs_diffusers"] != "inf" and 0 < r["ssim_vs_diffusers"] <= 1
        else:
            assert r["full_steps"] < r["steps"] and "psnr_vs_none" in r and "ssim_vs_none" in r
    table = (tmp_path / "speed.md").read_text()
    assert table.count("| full/none | edit |") == 6 and table.count("| full/int8 | edit |") == 6
    assert "refused: memory mode 'group-offload' needs a CUDA GPU" in table
