"""Memory modes: the chooser (a pure function of free GPU memory and component sizes), start-up refusals of
modes this machine can't run, and every mode's mechanics on the tiny model on the CPU (the offload modes' hooks
move weights CPU to CPU here; bit-identical output shows the placement changes nothing but where weights live).
CUDA-only parts (streams, fp8, int4, real multi-GPU) are in test_gpu_fast_path.py."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from pipelines.editor import load_components
from pipelines.memory import (
    ComponentSizes,
    GiB,
    MemoryModeError,
    MemoryPlan,
    apply_memory_plan,
    check_plan,
    choose_memory_mode,
    component_sizes,
    resolve_plan,
)
from pipelines.quantization import TRANSFORMER_BLOCKS

# FLUX.2 [dev] in bf16: 32B-parameter transformer, 24B-parameter text encoder (Mistral Small 3.x), VAE ~84M.
FLUX2_DEV = ComponentSizes(transformer=64 * GiB, text_encoder=48 * GiB, vae=int(0.16 * GiB))


@pytest.mark.parametrize(
    ("free_gib", "quantization", "mode", "quant", "device", "te_device"),
    [
        ([], "none", "full", "none", "cpu", None),
        ([141], "none", "full", "none", "cuda:0", None),  # H200: everything fits
        ([79], "none", "offload-text-encoder", "none", "cuda:0", None),  # H100: text encoder streamed
        ([79, 79], "none", "multi-gpu", "none", "cuda:0", "cuda:1"),  # two H100s: text encoder on the second
        ([20, 79], "none", "offload-text-encoder", "none", "cuda:1", None),  # the emptier GPU is used
        ([47], "none", "group-offload", "none", "cuda:0", None),  # L40S / A6000: bf16 transformer doesn't fit
        ([47], "auto", "offload-text-encoder", "int8", "cuda:0", None),  # ... unless quantized
        ([31], "auto", "offload-text-encoder", "int4", "cuda:0", None),  # 32 GB cards: int4
        # below that (with a 10 GiB reserve): streamed, in int8 (int4 weights can't be streamed: refused there)
        ([23], "auto", "group-offload", "int8", "cuda:0", None),
        ([141], "auto", "full", "none", "cuda:0", None),  # auto keeps bf16 wherever it fits
        ([79], "fp8", "offload-text-encoder", "fp8", "cuda:0", None),  # fp8 (32 GB) + text encoder (48) + reserve > 79
    ],
)
def test_chooser_picks_the_fastest_mode_that_fits(free_gib, quantization, mode, quant, device, te_device):
    plan = choose_memory_mode([int(g * GiB) for g in free_gib], FLUX2_DEV, quantization=quantization)
    assert (plan.mode, plan.quantization, plan.device, plan.text_encoder_device) == (mode, quant, device, te_device)
    assert plan.reason


def test_chooser_uses_fp8_when_the_gpu_can_and_respects_the_reserve():
    assert choose_memory_mode([47 * GiB], FLUX2_DEV, quantization="auto", fp8_capable=True).quantization == "fp8"
    tight = choose_memory_mode([int(79 * GiB)], FLUX2_DEV, reserve_bytes=20 * GiB)
    assert tight.mode == "group-offload"  # 64 GB + 20 GB reserve doesn't fit in 79
    assert choose_memory_mode([79 * GiB], FLUX2_DEV, primary=0).device == "cuda:0"
    with pytest.raises(ValueError, match="quantization"):
        choose_memory_mode([79 * GiB], FLUX2_DEV, quantization="int3")


def test_component_sizes_come_from_the_headers_on_disk(tiny_weights):
    sizes = component_sizes(tiny_weights, torch.float32)
    components = load_components(tiny_weights, torch.float32)
    for name in ("transformer", "text_encoder", "vae"):
        params = sum(p.numel() for p in components[name].parameters())
        buffers = sum(b.numel() for _, b in components[name].named_buffers() if b is not None)
        assert params * 4 <= getattr(sizes, name) <= (params + buffers) * 4
    assert component_sizes(tiny_weights, torch.bfloat16).transformer * 2 == sizes.transformer


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
@pytest.mark.parametrize("mode", ["offload-text-encoder", "model-offload", "group-offload", "multi-gpu"])
def test_cuda_modes_are_refused_without_a_gpu(mode):
    with pytest.raises(MemoryModeError, match="needs a CUDA GPU"):
        resolve_plan(mode, FLUX2_DEV, free_bytes_per_gpu=[])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
def test_gpu_only_quantizations_and_devices_are_refused_without_a_gpu():
    with pytest.raises(ValueError, match="compute capability 8.9"):  # pipelines.quantization.QuantizationError
        check_plan(MemoryPlan("full", "cpu", quantization="fp8"))
    with pytest.raises(MemoryModeError, match="CUDA is not available"):
        check_plan(MemoryPlan("full", "cuda:0"))
    with pytest.raises(MemoryModeError, match="unknown memory mode"):
        check_plan(MemoryPlan("everything", "cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
def test_server_refuses_a_cuda_mode_at_start_up_on_the_cpu(tiny_weights, tmp_path):
    ran = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--weights", str(tiny_weights), "--data-dir", str(tmp_path)],
        env={**os.environ, "FLUX2_MEMORY_MODE": "group-offload"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 2
    assert "error: memory mode 'group-offload' needs a CUDA GPU" in ran.stderr


def run_pipe(pipe) -> np.ndarray:
    reference = PIL.Image.fromarray(np.random.default_rng(2).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    return np.asarray(
        pipe(
            image=[reference],
            prompt="p",
            height=192,
            width=256,
            num_inference_steps=4,
            generator=torch.Generator("cpu").manual_seed(9),
        ).images[0]
    )


@pytest.fixture(scope="module")
def baseline(tiny_weights):
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline(**load_components(tiny_weights, torch.float32))
    pipe.set_progress_bar_config(disable=True)
    return run_pipe(pipe)


@pytest.mark.parametrize(
    "plan",
    [
        MemoryPlan("full", "cpu"),
        MemoryPlan("multi-gpu", "cpu", text_encoder_device="cpu"),
        MemoryPlan("offload-text-encoder", "cpu"),
        MemoryPlan("group-offload", "cpu"),
    ],
    ids=lambda p: p.mode,
)
def test_each_placement_runs_and_changes_nothing_but_placement(tiny_weights, baseline, plan):
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline(**load_components(tiny_weights, torch.float32))
    pipe.set_progress_bar_config(disable=True)
    apply_memory_plan(pipe, plan)
    assert pipe._execution_device == torch.device("cpu")
    assert np.array_equal(run_pipe(pipe), baseline)


def test_int8_transformer_runs_on_the_cpu(tiny_weights, baseline):
    pytest.importorskip("torchao")
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline(**load_components(tiny_weights, torch.float32))
    pipe.set_progress_bar_config(disable=True)
    apply_memory_plan(pipe, MemoryPlan("full", "cpu", quantization="int8"))
    assert "Int8" in type(pipe.transformer.transformer_blocks[0].attn.to_q.weight).__name__
    image = run_pipe(pipe)
    assert image.shape == baseline.shape and image.std() > 0
    assert not np.array_equal(image, baseline)  # int8 weights: close, not equal
    assert np.abs(image.astype(int) - baseline).mean() < 40


def test_int8_quantizes_the_base_weights_and_leaves_the_distilled_adapter_alone(tiny_weights):
    pytest.importorskip("torchao")
    from pipelines import EditCall, load_editor
    from pipelines.runtime import RuntimeOptions

    editor = load_editor(tiny_weights, "cpu", options=RuntimeOptions(memory_mode="full", quantization="int8"))
    assert editor.capabilities()["memory"]["quantization"] == "int8"
    lora_layers = {
        name: m
        for name, m in editor.pipe.transformer.named_modules()
        if hasattr(m, "base_layer") and hasattr(m, "lora_A")
    }
    assert any(name.startswith(TRANSFORMER_BLOCKS) for name in lora_layers), "the tiny build's turbo LoRA is loaded"
    for name, layer in lora_layers.items():
        # the repeated blocks' base weights only (pipelines.quantization.transformer_layer_filter)
        assert ("Int8" in type(layer.base_layer.weight).__name__) == name.startswith(TRANSFORMER_BLOCKS)
        assert all(type(a.weight) is torch.nn.Parameter for a in layer.lora_A.values())
    reference = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    call = EditCall(images=[reference], prompt="p", width=64, height=64, profile="turbo", seed=1)
    image = np.asarray(editor.edit(call).images[0])
    assert image.shape == (64, 64, 3) and image.std() > 0


# `flux2-server doctor`: the mode `serve` would run with this configuration, from this module's chooser and checks.


def test_doctor_sizes_flux2_dev_on_one_80gb_gpu_as_serve_would(tiny_weights, monkeypatch):
    """The doctor's rows come from resolve_plan: the configured mode and quantization, and what auto picks.

    The GPU is simulated (free memory given, CUDA reported present) and the component sizes are FLUX.2 [dev]'s."""
    from pipelines import memory
    from server.commands.doctor import memory_mode
    from server.config import Settings

    monkeypatch.setattr(memory.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memory, "fp8_capable", lambda device: True)  # an H100
    monkeypatch.setattr(memory, "component_sizes", lambda weights, dtype: FLUX2_DEV)
    rows = dict(memory_mode(tiny_weights, [79 * GiB], Settings()))
    assert rows["memory mode"].startswith("[configured: auto, quantization none] offload-text-encoder on cuda:0")
    assert "text encoder is streamed" in rows["memory mode"]
    assert "(torch.bfloat16)" in rows["weights size"] and "transformer 64.0 GiB" in rows["weights size"]
    assert "memory mode (auto)" not in rows  # auto with quantization auto keeps bf16 here: the same plan
    rows = dict(memory_mode(tiny_weights, [47 * GiB], Settings(memory_mode="model-offload")))
    assert rows["memory mode"].startswith("[configured: model-offload, quantization none] model-offload on cuda:0")
    assert "offload-text-encoder on cuda:0 (quantization fp8)" in rows["memory mode (auto)"]
    rows = dict(memory_mode(tiny_weights, [79 * GiB], Settings(memory_mode="multi-gpu")))
    assert "refused: memory mode 'multi-gpu' needs FLUX2_TEXT_ENCODER_DEVICE" in rows["memory mode"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
def test_doctor_says_why_serve_would_refuse_the_configured_mode_here(tiny_weights):
    ran = subprocess.run(
        [sys.executable, "-m", "server.cli", "doctor", "--weights", str(tiny_weights), "--quantization", "int8"],
        env={**os.environ, "FLUX2_MEMORY_MODE": "group-offload"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in ran.stdout.splitlines() if line.strip())
    assert rows["memory mode"].startswith(
        "[configured: group-offload, quantization int8] refused: memory mode 'group-offload' needs a CUDA GPU"
    )
    assert rows["memory mode (auto)"].endswith("full on cpu (quantization none): no GPU: everything on the CPU")


# Through the server: the modes this CPU can run. `auto` (which picks `full` here, unquantized) is what every other
# server test runs, each acceleration level included (test_acceleration.py); this one sets `full` explicitly with
# the int8 transformer, the one quantization that runs on a CPU.


def test_server_runs_full_mode_with_int8_for_each_profile_and_level(tiny_weights, tmp_path):
    pytest.importorskip("torchao")
    quantization = "int8"
    import httpx

    from benchmarks.loopback import start_server
    from tests.conftest import data_uri, decode, image_bytes

    env = {"FLUX2_MEMORY_MODE": "full", "FLUX2_QUANTIZATION": quantization}
    process, url = start_server(tiny_weights, tmp_path / "data", tmp_path / "server.log", env=env)
    try:
        with httpx.Client(timeout=300) as client:
            memory = client.get(f"{url}/health").json()["capabilities"]["memory"]
            assert (memory["mode"], memory["device"], memory["quantization"]) == ("full", "cpu", quantization)
            runs = [("edit", level) for level in ("none", "regular", "high")] + [("turbo", None), ("flash", None)]
            for profile, level in runs:
                body = {
                    "prompt": "p",
                    "image_urls": [data_uri(image_bytes(96, 96, seed=4))],
                    "image_size": {"width": 512, "height": 512},
                    "seed": 5,
                    "enable_safety_checker": False,
                    "sync_mode": True,
                }
                if level:
                    body |= {"acceleration": level, "num_inference_steps": 8}
                endpoint = "fal-ai/flux-2/edit" if profile == "edit" else f"fal-ai/flux-2/{profile}/edit"
                response = client.post(f"{url}/{endpoint}", json=body)
                assert response.status_code == 200, (profile, level, response.text)
                data_url = response.json()["images"][0]["url"]
                image = np.asarray(decode(base64.b64decode(data_url.partition(",")[2])).convert("RGB"))
                assert image.shape == (512, 512, 3) and image.std() > 0, (profile, level)
    finally:
        process.terminate()
        process.wait(timeout=30)
