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
    assert speed.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["source"] == "tiny" and "smoke run" in report["note"]
    assert report["command"] == "python -m benchmarks.speed " + " ".join(argv)
    assert report["goals"] == "not applicable: no GPU" and report["device"].startswith("CPU")
    assert report["server"]["memory"]["mode"] == "full"
    assert report["distilled_adapters"] == ["turbo"]  # the tiny build's LoRA, loaded as the server loads it
    cases = {(r["profile"], r["references"], r["acceleration"]) for r in report["results"]}
    assert cases == {("edit", n, a) for n in (1, 4) for a in ("none", "regular", "high")} | {
        (p, n, "none") for p in ("turbo", "flash") for n in (1, 4)
    }
    for r in report["results"]:
        assert r["s_per_image"] > 0 and r["s_per_step"] > 0 and r["diffusers_s_per_image"] > 0
        assert math.isclose(r["speedup_vs_diffusers"], r["diffusers_s_per_image"] / r["s_per_image"], rel_tol=0.01)
        if r["acceleration"] == "none" and r["profile"] == "edit":
            # bit parity: plain diffusers' pixels
            assert r["psnr_vs_diffusers"] == "inf" and r["ssim_vs_diffusers"] == 1.0
            assert r["full_steps"] == r["steps"] == 8
        if r["acceleration"] != "none":
            assert r["full_steps"] < r["steps"] and "psnr_vs_none" in r and "ssim_vs_none" in r
    assert (tmp_path / "speed.md").read_text().count("| edit |") == 6
