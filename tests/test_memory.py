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

from pipelines import memory
from pipelines.editor import load_components
from pipelines.memory import (
    PLANNED_REQUESTS,
    GiB,
    Hardware,
    MemoryModeError,
    MemoryPlan,
    Request,
    activation_reserve_bytes,
    apply_memory_plan,
    check_plan,
    choose_memory_mode,
    component_sizes,
    flux2_dev_sizes,
    load_devices,
    module_sizes,
    resolve_plan,
)
from pipelines.quantization import TRANSFORMER_BLOCKS

# FLUX.2 [dev] in bf16, from the parameter counts in pipelines/memory.py (checked against the real configs below).
FLUX2_DEV = flux2_dev_sizes()


def test_flux2_dev_sizes_are_the_real_architectures_on_the_meta_device():
    """The constants against FLUX.2 [dev]'s classes at their real configurations, built without memory: the
    transformer as benchmarks/speed.py --random-full-size builds it, the text encoder with its lm_head untied (as in
    the real checkpoint; Mistral3Config() ties it), the VAE at AutoencoderKLFlux2()'s defaults."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from benchmarks.speed import FULL_SIZE_TRANSFORMER

    with torch.device("meta"):
        transformer = Flux2Transformer2DModel(**FULL_SIZE_TRANSFORMER)
        text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(tie_word_embeddings=False))
        vae = AutoencoderKLFlux2()
    assert module_sizes(transformer, text_encoder, vae, torch.bfloat16) == FLUX2_DEV

    count = lambda module: sum(p.numel() for p in module.parameters())
    language = text_encoder.model.language_model
    assert len(language.layers) == memory.FLUX2_DEV_TEXT_ENCODER_NUM_LAYERS
    assert {count(layer) for layer in language.layers} == {memory.FLUX2_DEV_TEXT_ENCODER_LAYER_PARAMS}
    assert count(language.embed_tokens) == memory.FLUX2_DEV_TEXT_ENCODER_EMBEDDING_PARAMS
    assert count(text_encoder.lm_head) == memory.FLUX2_DEV_TEXT_ENCODER_LM_HEAD_PARAMS
    assert count(text_encoder.model.vision_tower) == memory.FLUX2_DEV_VISION_TOWER_PARAMS
    assert count(text_encoder.model.multi_modal_projector) == memory.FLUX2_DEV_PROJECTOR_PARAMS
    blocks = count(transformer.transformer_blocks) + count(transformer.single_transformer_blocks)
    assert blocks == memory.FLUX2_DEV_TRANSFORMER_BLOCK_PARAMS
    # the figures the issue quotes: 32.22 B, 24.01 B, 0.084 B; bf16 60.0 / 44.7 GiB; cut encoder 10.6 GiB smaller
    assert round(count(transformer) / 1e9, 2) == 32.22 and round(count(text_encoder) / 1e9, 2) == 24.01
    assert round(count(vae) / 1e9, 3) == 0.084
    assert round(FLUX2_DEV.transformer / GiB, 1) == 60.0 and round(FLUX2_DEV.text_encoder / GiB, 1) == 44.7
    assert round((FLUX2_DEV.text_encoder - FLUX2_DEV.text_encoder_truncated) / GiB, 1) == 10.6
    assert round(FLUX2_DEV.transformer_bytes("fp8") / GiB, 1) == 30.8  # the blocks in 8 bits, the rest bf16


def test_component_sizes_report_the_cut_text_encoder_from_the_headers(tmp_path):
    """A 40-layer Mistral3 text encoder with an untied head, saved by transformers: the sizes read from the
    safetensors headers say what cutting it to 31 layers without lm_head leaves, and match the cut module."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 40, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "head_dim": 8, "image_size": 32, "patch_size": 8},
        tie_word_embeddings=False,
    )  # fmt: skip
    encoder = Mistral3ForConditionalGeneration(config)
    encoder.save_pretrained(tmp_path / "text_encoder")
    sizes = component_sizes(tmp_path, torch.float32)
    assert sizes.text_encoder == sum(p.numel() for p in encoder.parameters()) * 4
    assert len(sizes.text_encoder_layers) == 40 and sizes.text_encoder_lm_head == 64 * 16 * 4
    del encoder.model.language_model.layers[31:]
    encoder.lm_head = None
    assert sizes.text_encoder_truncated == sum(p.numel() for p in encoder.parameters()) * 4
    assert sizes.text_encoder_bytes(layers=None) == sizes.text_encoder


def test_component_sizes_come_from_the_headers_on_disk(tiny_weights):
    sizes = component_sizes(tiny_weights, torch.float32)
    components = load_components(tiny_weights, torch.float32)
    for name in ("transformer", "text_encoder", "vae"):
        params = sum(p.numel() for p in components[name].parameters())
        buffers = sum(b.numel() for _, b in components[name].named_buffers() if b is not None)
        assert params * 4 <= getattr(sizes, name) <= (params + buffers) * 4
    assert component_sizes(tiny_weights, torch.bfloat16).transformer * 2 == sizes.transformer
    assert len(sizes.text_encoder_layers) == 30  # the tiny encoder: FLUX.2's cut to 31 layers keeps all of it
    assert 0 < sizes.transformer_blocks < sizes.transformer


def test_the_activation_reserve_follows_the_token_count():
    """Fitted to gpu-findings.md's estimates (provisional until measured): 3-4 GiB with one 1024^2 reference,
    6-8 with four, ~10 at 2048^2 with four; token counts as in its table."""
    one, four = Request(1024, 1024, 1), Request(1024, 1024, 4)
    large = Request(2048, 2048, 4)
    assert (Request(1024, 1024, 0).tokens, one.tokens, four.tokens, large.tokens) == (4608, 8704, 20992, 33280)
    assert 3 * GiB <= activation_reserve_bytes(one) <= 4 * GiB
    assert 6 * GiB <= activation_reserve_bytes(four) <= 8 * GiB
    assert 9.5 * GiB <= activation_reserve_bytes(large) <= 10.5 * GiB
    assert Request(1024, 1024, 1, reference_pixels=4096 * 4096).tokens == one.tokens  # references scaled to 1 MP
    assert PLANNED_REQUESTS[0] == large  # the API's largest: 2048 px a side, 4 references


def test_a_smaller_model_of_the_family_plans_a_smaller_reserve(tiny_weights):
    """The tiny model on the CPU plans its host peak from its own width, not FLUX.2 [dev]'s activations: a laptop
    with 6 GiB free runs it (it was refused: "the weights need 14.0 GiB of host RAM on the CPU")."""
    large = PLANNED_REQUESTS[0]
    assert activation_reserve_bytes(large, flux2_dev_sizes()) == activation_reserve_bytes(large)
    tiny = component_sizes(tiny_weights, torch.float32)
    assert activation_reserve_bytes(large, tiny) < 256 * 1024**2
    plan = choose_memory_mode([], tiny, host_bytes=6 * GiB)
    assert plan.device == "cpu" and plan.peak_host_bytes < 5 * GiB


@pytest.mark.parametrize(
    ("free_gib", "quantization", "mode", "quant", "te_layers", "device", "te_device"),
    [
        ([], "none", "full", "none", None, "cpu", None),
        ([140], "none", "full", "none", None, "cuda:0", None),  # H200: everything fits
        ([79], "none", "offload-text-encoder", "none", 31, "cuda:0", None),  # H100 held to bf16: encoder streamed
        ([79, 79], "none", "multi-gpu", "none", None, "cuda:0", "cuda:1"),  # two H100s: encoder on the second
        ([20, 79], "none", "offload-text-encoder", "none", 31, "cuda:1", None),  # the emptier GPU is used
        ([47], "none", "group-offload", "none", 31, "cuda:0", None),  # bf16 transformer doesn't fit 48 GB
        ([47], "auto", "offload-text-encoder", "int8", 31, "cuda:0", None),  # ... unless quantized (no fp8 here)
        ([23], "auto", "offload-text-encoder", "int4", 31, "cuda:0", None),  # 24 GB: 4-bit, smaller requests
        ([15], "auto", "group-offload", "none", 31, "cuda:0", None),  # below that: streamed every step
        ([140], "auto", "full", "none", None, "cuda:0", None),  # auto keeps bf16 wherever it fits
        ([79], "auto", "full", "int8", 31, "cuda:0", None),  # 80 GB: 8-bit transformer, cut encoder, resident
        ([79], "fp8", "full", "fp8", 31, "cuda:0", None),  # a configured fp8 transformer: the encoder stays bf16
    ],
)
def test_chooser_picks_the_fastest_mode_that_fits(free_gib, quantization, mode, quant, te_layers, device, te_device):
    plan = choose_memory_mode([int(g * GiB) for g in free_gib], FLUX2_DEV, quantization=quantization)
    assert (plan.mode, plan.quantization, plan.text_encoder_layers, plan.device, plan.text_encoder_device) == (
        mode,
        quant,
        te_layers,
        device,
        te_device,
    )
    assert plan.reason and plan.peak_host_bytes
    assert plan.prompt_expansion == (te_layers is None and mode not in ("offload-text-encoder", "group-offload"))
    if device != "cpu":
        assert plan.peak_gpu_bytes <= free_gib[int(device[-1])] * GiB


def test_chooser_uses_fp8_when_the_gpu_can_and_respects_a_fixed_reserve():
    assert choose_memory_mode([47 * GiB], FLUX2_DEV, quantization="auto", fp8_capable=True).quantization == "fp8"
    tight = choose_memory_mode([int(79 * GiB)], FLUX2_DEV, reserve_bytes=20 * GiB, quantization="none")
    assert tight.mode == "group-offload"  # 60 GiB + 20 GiB reserve doesn't fit in 79
    assert tight.sized_for == "a fixed reserve of 20.0 GiB" and tight.reserve_bytes == 20 * GiB
    assert choose_memory_mode([79 * GiB], FLUX2_DEV, primary=0).device == "cuda:0"
    with pytest.raises(ValueError, match="quantization"):
        choose_memory_mode([79 * GiB], FLUX2_DEV, quantization="int3")


def test_host_ram_decides_between_streaming_and_resident_plans():
    """Plain streamed weights are pinned in place (pin_blocks): held once in host RAM. Quantized ones are pinned by
    diffusers beside the original (twice) unless pinned on the fly (low_cpu_mem_usage: once); where even that
    doesn't fit, serve refuses."""
    streamed = FLUX2_DEV.text_encoder_streamed(31)
    for host in (64, 128):
        plan = choose_memory_mode([47 * GiB], FLUX2_DEV, fp8_capable=True, host_bytes=host * GiB)
        assert (plan.mode, plan.quantization, plan.low_cpu_mem_usage) == ("offload-text-encoder", "fp8", False)
        assert plan.peak_host_bytes == memory.HOST_BASE_BYTES + streamed
        assert "pinned on the fly" not in plan.reason
    with pytest.raises(MemoryModeError, match="not enough host RAM.*needs 95.8 GiB of host RAM even pinned on the fly"):
        choose_memory_mode([15 * GiB], FLUX2_DEV, host_bytes=64 * GiB)
    configured = resolve_plan("offload-text-encoder", FLUX2_DEV, hardware=Hardware.simulate(80, 1, 64))
    assert not configured.low_cpu_mem_usage and configured.reason.startswith("set by configuration")
    # an int8 transformer streamed block by block: diffusers pins the quantized blocks beside them (twice) ...
    blocks = FLUX2_DEV.transformer_bytes("int8") - (FLUX2_DEV.transformer - FLUX2_DEV.transformer_blocks)
    roomy = resolve_plan("group-offload", FLUX2_DEV, quantization="int8", hardware=Hardware.simulate(24, 1, 128))
    assert not roomy.low_cpu_mem_usage
    assert roomy.peak_host_bytes == memory.HOST_BASE_BYTES + 2 * blocks + streamed
    # ... where that doesn't fit, they are pinned on the fly (once)
    tight = resolve_plan("group-offload", FLUX2_DEV, quantization="int8", hardware=Hardware.simulate(24, 1, 80))
    assert tight.low_cpu_mem_usage and "pinned on the fly" in tight.reason
    assert tight.peak_host_bytes == memory.HOST_BASE_BYTES + blocks + streamed
    with pytest.raises(MemoryModeError, match="for memory mode 'group-offload': it needs 95.8 GiB even with"):
        resolve_plan("group-offload", FLUX2_DEV, quantization="none", hardware=Hardware.simulate(80, 1, 64))
    with pytest.raises(MemoryModeError, match="no GPU, and the weights need"):
        choose_memory_mode([], flux2_dev_sizes(itemsize=4), host_bytes=128 * GiB)  # fp32 on the CPU: 210 GiB


# The plan per card: GiB of each GPU, GPUs, host RAM GiB, fp8 -> mode, transformer, text encoder (quantization,
# layers), peak GPU GiB, peak host GiB, the request the reserve covers; or the refusal. Cards are simulated as
# doctor --gpu-memory does (less 1 GiB of CUDA context). Rows marked "any" hold for 64, 128 and 256 GB of host RAM.
LARGEST, ONE_REFERENCE = "2048x2048 output, 4 references", "1024x1024 output, 1 reference"
CARD_PLANS = [
    (16, 1, 64, True, "refused: not enough host RAM"),
    (16, 1, 128, True, ("group-offload", "none", "none", 31, 13.5, 95.8, "1024x1024 output, 4 references")),
    (16, 1, 256, True, ("group-offload", "none", "none", 31, 13.5, 95.8, "1024x1024 output, 4 references")),
    (24, 1, 64, True, ("offload-text-encoder", "int4", "none", 31, 22.0, 37.3, ONE_REFERENCE)),
    (24, 1, 128, True, ("offload-text-encoder", "int4", "none", 31, 22.0, 37.3, ONE_REFERENCE)),
    (24, 1, 256, False, ("offload-text-encoder", "int4", "none", 31, 22.0, 37.3, ONE_REFERENCE)),
    (48, 1, 64, True, ("offload-text-encoder", "fp8", "none", 31, 41.7, 37.3, LARGEST)),
    (48, 1, 64, False, ("offload-text-encoder", "int8", "none", 31, 41.7, 37.3, LARGEST)),
    (48, 1, 128, True, ("offload-text-encoder", "fp8", "none", 31, 41.7, 37.3, LARGEST)),
    (48, 1, 256, False, ("offload-text-encoder", "int8", "none", 31, 41.7, 37.3, LARGEST)),
    (80, 1, "any", True, ("full", "fp8", "none", 31, 75.1, 4.0, LARGEST)),
    (80, 1, "any", False, ("full", "int8", "none", 31, 75.1, 4.0, LARGEST)),
    (94, 1, "any", True, ("full", "none", "fp8", 31, 88.3, 4.0, LARGEST)),
    (94, 1, "any", False, ("full", "none", "int8", 31, 88.3, 4.0, LARGEST)),
    (141, 1, "any", True, ("full", "none", "none", None, 114.9, 4.0, LARGEST)),
    (24, 2, "any", True, ("multi-gpu", "int4", "fp8", 31, 21.2, 4.0, ONE_REFERENCE)),
    (24, 2, "any", False, ("multi-gpu", "int4", "int8", 31, 21.2, 4.0, ONE_REFERENCE)),
    (48, 2, "any", True, ("multi-gpu", "fp8", "none", None, 40.9, 4.0, LARGEST)),
    (48, 2, "any", False, ("multi-gpu", "int8", "none", None, 40.9, 4.0, LARGEST)),
    (80, 2, "any", True, ("multi-gpu", "none", "none", None, 70.2, 4.0, LARGEST)),
    (94, 2, "any", True, ("multi-gpu", "none", "none", None, 70.2, 4.0, LARGEST)),
    (141, 2, "any", True, ("full", "none", "none", None, 114.9, 4.0, LARGEST)),
]


@pytest.mark.parametrize(
    ("card", "gpus", "host", "fp8", "expected"),
    [
        (card, gpus, h, fp8, expected)
        for card, gpus, host, fp8, expected in CARD_PLANS
        for h in ((64, 128, 256) if host == "any" else (host,))
    ],
)
def test_the_plan_per_card(card, gpus, host, fp8, expected):
    hardware = Hardware.simulate(card, gpus, host, fp8)
    if isinstance(expected, str):
        with pytest.raises(MemoryModeError, match=expected.removeprefix("refused: ")):
            resolve_plan("auto", FLUX2_DEV, quantization="auto", hardware=hardware)
        return
    plan = resolve_plan("auto", FLUX2_DEV, quantization="auto", hardware=hardware)
    peaks = (round(plan.peak_gpu_bytes / GiB, 1), round(plan.peak_host_bytes / GiB, 1))
    got = (plan.mode, plan.quantization, plan.text_encoder_quantization, plan.text_encoder_layers, *peaks)
    assert (*got, plan.sized_for) == expected
    assert plan.prompt_expansion == (plan.text_encoder_layers is None and plan.mode in ("full", "multi-gpu"))
    # auto streams only plain weights, which pin_blocks pins in place (held once): never pinned on the fly
    assert not plan.low_cpu_mem_usage
    assert plan.peak_gpu_bytes <= hardware.gpu_free_bytes[0] and plan.peak_host_bytes <= hardware.host_bytes
    if plan.mode == "multi-gpu":
        assert plan.text_encoder_device == "cuda:1"
        second = memory.estimate_peaks(plan, FLUX2_DEV, plan.reserve_bytes).text_encoder_gpu
        assert 0 < second <= hardware.gpu_free_bytes[1]


def test_readme_shows_the_plan_per_card_as_the_chooser_makes_it():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = "<!-- plan-table: start -->\n", "\n<!-- plan-table: end -->"
    assert start in readme and end in readme, "README's Speed and memory section lost its plan table markers"
    shown = readme.split(start, 1)[1].split(end, 1)[0]
    assert shown == memory.card_table(), "README's plan table is stale: paste card_table()'s output in"


def test_a_configured_text_encoder_device_keeps_the_chosen_quantization():
    plan = resolve_plan(
        "auto", FLUX2_DEV, text_encoder_device="cuda:1", quantization="auto", hardware=Hardware.simulate(80, 2, 128)
    )
    assert (plan.mode, plan.text_encoder_device) == ("multi-gpu", "cuda:1")
    plan = resolve_plan(
        "auto", FLUX2_DEV, device="cuda:1", text_encoder_device="cuda:0", hardware=Hardware.simulate(141, 2, 128)
    )
    assert (plan.device, plan.text_encoder_device, plan.reason) == (
        "cuda:1",
        "cuda:0",
        "text encoder placed on cuda:0 by configuration",
    )
    with pytest.raises(MemoryModeError, match="device cuda:2 does not exist: 2 GPU"):
        resolve_plan("full", FLUX2_DEV, device="cuda:2", hardware=Hardware.simulate(80, 2, 128))


@pytest.mark.parametrize(
    ("mode", "card", "expected"),
    [
        ("full", 80, ("full", "fp8", "none", 31, "set by configuration, quantization auto: everything resident")),
        ("full", 48, ("full", "int4", "fp8", 31, "set by configuration, quantization auto: everything resident")),
        ("offload-text-encoder", 48, ("offload-text-encoder", "fp8", "none", 31, "set by configuration, quantization")),
        ("model-offload", 80, ("model-offload", "none", "none", None, "set by configuration, quantization auto")),
        ("full", 24, ("full", "none", "none", None, "set by configuration")),  # nothing fits: the operator's call
    ],
)
def test_a_configured_mode_with_quantization_auto_gets_the_least_quantization_that_fits_it(mode, card, expected):
    plan = resolve_plan(mode, FLUX2_DEV, quantization="auto", hardware=Hardware.simulate(card, 1, 128))
    got = (plan.mode, plan.quantization, plan.text_encoder_quantization, plan.text_encoder_layers)
    assert got == expected[:4] and plan.reason.startswith(expected[4])


def test_simulated_hardware_checks_fp8_against_the_simulated_card():
    with pytest.raises(ValueError, match="compute capability 8.9"):  # pipelines.quantization.QuantizationError
        resolve_plan("full", FLUX2_DEV, quantization="fp8", hardware=Hardware.simulate(80, 1, 128, fp8=False))
    plan = resolve_plan("full", FLUX2_DEV, quantization="fp8", hardware=Hardware.simulate(80, 1, 128))
    assert (plan.mode, plan.quantization, plan.reason, plan.prompt_expansion) == (
        "full",
        "fp8",
        "set by configuration",
        True,
    )


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
    assert editor.capabilities().runtime["memory"]["quantization"] == "int8"
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


def test_doctor_sizes_flux2_dev_on_simulated_cards_as_serve_would():
    """The doctor's rows come from resolve_plan: the configured mode and quantization, and what auto picks, for the
    real FLUX.2 [dev] sizes (no --weights) on simulated hardware."""
    from server.cli.doctor import memory_mode
    from server.config import Settings

    h100 = Hardware.simulate(80, 1, 128)
    rows = dict(memory_mode(None, [], Settings(), h100))
    assert rows["memory mode"].startswith("[configured: auto, quantization auto] full on cuda:0 (quantization fp8)")
    assert "text encoder cut to 31 decoder layers without lm_head" in rows["memory mode"]
    assert "(torch.bfloat16; FLUX.2 [dev]" in rows["weights size"] and "transformer 60.021 GiB" in rows["weights size"]
    assert "memory mode (auto)" not in rows  # the configured plan is auto's
    rows = dict(memory_mode(None, [], Settings(memory_mode="model-offload", quantization="none"), h100))
    assert rows["memory mode"].startswith("[configured: model-offload, quantization none] model-offload on cuda:0")
    assert "full on cuda:0 (quantization fp8)" in rows["memory mode (auto)"]
    rows = dict(memory_mode(None, [], Settings(memory_mode="multi-gpu"), h100))
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
    assert "full on cpu (quantization none): no GPU: everything on the CPU" in rows["memory mode (auto)"]


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


# The load path: each model read straight onto the device the plan keeps it on, nothing moved after.


@pytest.mark.parametrize(
    ("plan", "transformer", "text_encoder", "vae"),
    [
        (MemoryPlan("full", "cuda:0"), "cuda:0", "cuda:0", "cuda:0"),
        (MemoryPlan("full", "cpu"), "cpu", "cpu", "cpu"),
        (MemoryPlan("multi-gpu", "cuda:0", text_encoder_device="cuda:1"), "cuda:0", "cuda:1", "cuda:0"),
        (MemoryPlan("offload-text-encoder", "cuda:0"), "cuda:0", "cpu", "cuda:0"),  # encoder streamed from CPU
        (MemoryPlan("model-offload", "cuda:0"), "cpu", "cpu", "cpu"),  # each moves whole when used
        (MemoryPlan("group-offload", "cuda:0"), "cpu", "cpu", "cuda:0"),
        (MemoryPlan("full", "cuda:0", quantization="fp8"), "cpu", "cuda:0", "cuda:0"),  # quantized layer by layer
        (MemoryPlan("full", "cuda:0", text_encoder_quantization="fp8"), "cuda:0", "cpu", "cuda:0"),
    ],
    ids=lambda v: v.mode if isinstance(v, MemoryPlan) else None,
)
def test_each_model_is_read_where_the_plan_keeps_it(plan, transformer, text_encoder, vae):
    assert load_devices(plan) == {"transformer": transformer, "text_encoder": text_encoder, "vae": vae}


def test_load_editor_reads_each_model_onto_its_device_and_copies_nothing_after(tiny_weights, monkeypatch):
    """Through the real call path: from_pretrained gets the plan's device (so weights go file -> device, one tensor
    at a time), and placing the pipeline afterwards copies no tensor (every storage is the one that was read)."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Mistral3ForConditionalGeneration

    from pipelines import load_editor
    from pipelines.runtime import Runtime, RuntimeOptions

    asked = {}
    for name, cls in [
        ("transformer", Flux2Transformer2DModel),
        ("vae", AutoencoderKLFlux2),
        ("text_encoder", Mistral3ForConditionalGeneration),
    ]:
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, _name=name, **kwargs):
            asked[_name] = kwargs.get("device_map")
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    storages = {}
    real_apply = Runtime.apply

    def apply(self, pipe):
        def pointers():
            return {
                (name, key): tensor.untyped_storage().data_ptr()
                for name in ("transformer", "text_encoder", "vae")
                for key, tensor in getattr(pipe, name).state_dict().items()
            }

        storages["read"] = pointers()
        real_apply(self, pipe)
        storages["placed"] = pointers()

    monkeypatch.setattr(Runtime, "apply", apply)
    editor = load_editor(tiny_weights, "cpu", options=RuntimeOptions(memory_mode="full"))
    assert asked == {"transformer": "cpu", "vae": "cpu", "text_encoder": "cpu"}
    assert storages["placed"] == storages["read"]

    caps = editor.capabilities().as_dict()
    assert set(caps["load_timings"]) == {"read", "place"} and all(v >= 0 for v in caps["load_timings"].values())
    assert caps["load_seconds"] == pytest.approx(sum(caps["load_timings"].values()), abs=0.002)
    monkeypatch.setattr(editor, "edit", lambda call: None)  # the warm-up's timing, not its image
    editor.warm_up()
    caps = editor.capabilities().as_dict()
    assert set(caps["load_timings"]) == {"read", "place", "warm_up"}
    assert caps["load_seconds"] == pytest.approx(sum(caps["load_timings"].values()), abs=0.003)


def test_vae_decodes_in_tiles_only_where_the_plan_kept_too_little_for_a_whole_decode():
    from pipelines.memory import vae_tiling_needed

    small_card = resolve_plan("auto", FLUX2_DEV, quantization="auto", hardware=Hardware.simulate(24, 1, 128))
    assert small_card.sized_for == "1024x1024 output, 1 reference"
    assert vae_tiling_needed(small_card, 2048, 2048)  # 6.0 GiB untiled decode against a ~4 GiB reserve
    assert not vae_tiling_needed(small_card, 1024, 1024)  # ~1 MP and below: always whole
    big_card = resolve_plan("auto", FLUX2_DEV, quantization="auto", hardware=Hardware.simulate(141, 1, 256))
    assert not vae_tiling_needed(big_card, 2048, 2048)  # sized for the largest request
    assert not vae_tiling_needed(MemoryPlan("full", "cpu"), 2048, 2048)  # the CPU: one memory, no reserve


def test_the_editor_tiles_the_decode_for_the_call_that_needs_it(tiny_weights, monkeypatch):
    from pipelines import EditCall, load_editor
    from pipelines import editor as editor_module

    editor = load_editor(tiny_weights, "cpu")
    seen = []
    decode = editor.pipe.vae.decode
    monkeypatch.setattr(
        editor.pipe.vae, "decode", lambda *a, **k: seen.append(editor.pipe.vae.use_tiling) or decode(*a, **k)
    )
    reference = PIL.Image.new("RGB", (64, 64), (10, 200, 30))
    call = EditCall(images=[reference], prompt="p", width=64, height=64, profile="flash", seed=1)
    whole = np.asarray(editor.edit(call).images[0])
    monkeypatch.setattr(editor_module, "vae_tiling_needed", lambda plan, w, h: True)
    tiled = np.asarray(editor.edit(call).images[0])
    assert seen == [False, True] and editor.pipe.vae.use_tiling is False  # for that call only
    assert np.array_equal(whole, tiled)  # the tiny output is smaller than one tile: the same decode
