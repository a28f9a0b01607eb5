"""CUDA paths on the tiny model: bf16, every memory mode, quantization, compile, acceleration. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from pipelines import EditCall, load_editor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_tiny_model_runs_on_cuda_in_bf16(tiny_weights):
    editor = load_editor(tiny_weights)
    assert editor.device.type == "cuda" and editor.dtype == torch.bfloat16
    reference = PIL.Image.new("RGB", (128, 96), (120, 40, 200))
    result = editor.edit(EditCall(images=[reference], prompt="p", width=512, height=512, profile="flash", seed=1))
    assert result.steps == 4 and [i.size for i in result.images] == [(512, 512)]
    again = editor.edit(EditCall(images=[reference], prompt="p", width=512, height=512, profile="flash", seed=1))
    assert list(result.images[0].getdata()) == list(again.images[0].getdata())


def _reference() -> PIL.Image.Image:
    return PIL.Image.new("RGB", (128, 96), (120, 40, 200))


def _edit(editor, **kw):
    call = EditCall(images=[_reference()], prompt="p", width=512, height=512, seed=1, **{"profile": "flash", **kw})
    return np.asarray(editor.edit(call).images[0])


@pytest.fixture(scope="module")
def full_bf16(tiny_weights):
    from pipelines.runtime import RuntimeOptions

    return _edit(load_editor(tiny_weights, options=RuntimeOptions(memory_mode="full")))


@pytest.mark.parametrize("mode", ["offload-text-encoder", "model-offload", "group-offload"])
def test_each_cuda_memory_mode_gives_the_full_modes_image(tiny_weights, full_bf16, mode):
    """Placement moves weights, it doesn't change them: each mode's image equals everything-on-the-GPU's."""
    from pipelines.runtime import RuntimeOptions

    editor = load_editor(tiny_weights, options=RuntimeOptions(memory_mode=mode))
    assert editor.capabilities().runtime["memory"]["mode"] == mode
    assert np.array_equal(_edit(editor), full_bf16)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_multi_gpu_puts_the_text_encoder_on_the_second_gpu(tiny_weights, full_bf16):
    from pipelines.runtime import RuntimeOptions

    editor = load_editor(tiny_weights, options=RuntimeOptions(memory_mode="multi-gpu", text_encoder_device="cuda:1"))
    assert next(editor.pipe.text_encoder.parameters()).device == torch.device("cuda:1")
    assert np.abs(_edit(editor).astype(int) - full_bf16).mean() < 2  # another GPU may round differently


@pytest.mark.parametrize("quantization", ["int8", "fp8", "int4"])
def test_quantized_transformer_runs_on_cuda(tiny_weights, full_bf16, quantization):
    pytest.importorskip("torchao")
    if quantization == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9 (Ada, Hopper)")
    from pipelines.runtime import RuntimeOptions

    editor = load_editor(tiny_weights, options=RuntimeOptions(memory_mode="full", quantization=quantization))
    image = _edit(editor)
    assert image.shape == full_bf16.shape and image.std() > 0


def test_compiled_transformer_gives_the_same_image_class_and_reports_compile_time(tiny_weights, full_bf16):
    from pipelines.runtime import RuntimeOptions

    editor = load_editor(tiny_weights, options=RuntimeOptions(memory_mode="full", compile=True))
    assert editor.capabilities().runtime["fast_path"]["compile_seconds"] > 0
    assert np.abs(_edit(editor).astype(int) - full_bf16).mean() < 2  # fused kernels may round differently


@pytest.mark.parametrize("level", ["regular", "high"])
def test_acceleration_levels_on_cuda(tiny_weights, level):
    editor = load_editor(tiny_weights)
    image = _edit(editor, profile="edit", num_inference_steps=28, acceleration=level)
    assert image.shape == (512, 512, 3) and image.std() > 0


# The load path and streaming on a real GPU (their CPU counterparts: test_memory.py, test_offload_streams.py).


def test_models_are_read_onto_the_gpu_and_streamed_layers_are_pinned(tiny_weights, full_bf16):
    from pipelines.runtime import RuntimeOptions

    editor = load_editor(tiny_weights, options=RuntimeOptions(memory_mode="offload-text-encoder"))
    pipe = editor.pipe
    assert {p.device.type for p in pipe.transformer.parameters()} == {"cuda"}
    text_encoder = pipe.text_encoder
    assert {p.device.type for p in text_encoder.model.vision_tower.parameters()} == {"cuda"}  # resident
    layers = list(text_encoder.model.language_model.layers.parameters())
    assert all(p.device.type == "cpu" and p.is_pinned() for p in layers)  # streamed, from pinned memory
    assert np.array_equal(_edit(editor), full_bf16)
    timings = editor.capabilities().as_dict()["load_timings"]
    assert timings["read"] > 0 and timings["place"] >= 0


def test_truncated_text_encoder_is_bit_exact_on_the_gpu(tiny_weights, monkeypatch):
    """The tiny encoder has 30 layers, so this checks lm_head's removal and the plan wiring in bf16 on CUDA;
    test_text_encoder.py checks the 40 -> 31 cut (CPU)."""
    import dataclasses

    from pipelines import runtime

    whole = load_editor(tiny_weights)
    resolve = runtime.resolve_plan
    monkeypatch.setattr(
        runtime, "resolve_plan", lambda *a, **k: dataclasses.replace(resolve(*a, **k), text_encoder_layers=31)
    )
    cut = load_editor(tiny_weights)
    assert cut.capabilities().as_dict()["prompt_expansion"] is False
    assert np.array_equal(_edit(cut), _edit(whole))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_context_parallel_on_two_gpus_gives_the_one_gpu_image(tiny_weights, full_bf16):
    """NCCL for the Ulysses all-to-alls (gloo beside it for the agreed cancel), each rank on its own GPU."""
    from pipelines.parallel import GroupSpec, ProcessGroupEditor

    group = ProcessGroupEditor(GroupSpec(str(tiny_weights), ["cuda:0", "cuda:1"]))
    try:
        steps = []
        call = EditCall(images=[_reference()], prompt="p", width=512, height=512, seed=1, profile="flash")
        call.on_step = lambda step, total: steps.append(step)
        split = np.asarray(group.edit(call).images[0], dtype=np.int16)
        assert steps == [1, 2, 3, 4]
        assert np.abs(split - _edit(full_bf16).astype(np.int16)).max() <= 2  # bf16: the split sums in another order
        assert group.capabilities()["device"] == "cuda:0,cuda:1"
    finally:
        group.stop()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_replica_on_the_second_gpu_sees_only_that_gpu(tiny_weights):
    from pipelines.parallel import GroupSpec, ProcessGroupEditor

    replica = ProcessGroupEditor(GroupSpec(str(tiny_weights), ["cuda:1"]))
    try:
        assert replica.capabilities()["device"] == "cuda:1"  # the rank's CUDA_VISIBLE_DEVICES=1: its cuda:0
        result = replica.edit(EditCall(images=[_reference()], prompt="p", width=512, height=512, profile="flash"))
        assert result.images[0].size == (512, 512)
    finally:
        replica.stop()


def test_fp8_quantizes_the_block_layers_only_on_cuda(tiny_weights):
    pytest.importorskip("torchao")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9 (Ada, Hopper)")
    from pipelines.quantization import TRANSFORMER_BLOCKS, quantized_layers
    from pipelines.runtime import RuntimeOptions

    editor = load_editor(tiny_weights, options=RuntimeOptions(memory_mode="full", quantization="fp8"))
    quantized = quantized_layers(editor.pipe.transformer)
    assert quantized and all(name.startswith(TRANSFORMER_BLOCKS) for name in quantized)
    assert set(quantized.values()) == {"Float8Tensor"}
    assert _edit(editor).std() > 0


def test_int4_uses_the_tinygemm_layout_on_cuda(tiny_weights):
    """torchao's default int4 packing needs mslk (absent); the tile-packed layout is made on the GPU."""
    pytest.importorskip("torchao")
    from pipelines.quantization import quantize_transformer, quantized_layers

    transformer = load_editor(tiny_weights, options=None).pipe.transformer  # bf16 on CUDA
    quantize_transformer(transformer, "int4", "cuda", int4_group_size=32)
    assert set(quantized_layers(transformer).values()) == {"Int4TilePackedTo4dTensor"}


def test_int8_text_encoder_on_cuda(tiny_weights):
    pytest.importorskip("torchao")
    from pipelines.quantization import quantize_text_encoder, quantized_layers

    editor = load_editor(tiny_weights)
    quantize_text_encoder(editor.pipe.text_encoder, "int8", "cuda")
    assert len(quantized_layers(editor.pipe.text_encoder)) == 30 * 7
    assert _edit(editor).std() > 0


def test_fast_path_on_turns_on_what_this_gpu_supports_and_caches_kernels(tiny_weights, full_bf16, tmp_path):
    from pipelines.runtime import RuntimeOptions

    options = RuntimeOptions(memory_mode="full", fast_path="on", compile_cache_dir=str(tmp_path / "cache"))
    editor = load_editor(tiny_weights, options=options)
    fast = editor.capabilities().as_dict()["fast_path"]
    assert fast["active"] and fast["compile"] is True
    if torch.cuda.get_device_capability() >= (8, 9):
        assert editor.capabilities().as_dict()["memory"]["quantization"] == "fp8"
        assert fast["attention_backend"] == "_native_cudnn"
    assert len(fast["warm_up"]) == 6  # 1 and 4 references, the turbo adapter, the acceleration levels
    assert all(w["graphs_compiled"] > 0 for w in fast["warm_up"][:5])
    assert any((tmp_path / "cache").rglob("*")), "inductor wrote its kernels to the persistent cache"
    assert np.abs(_edit(editor).astype(int) - full_bf16).mean() < 8  # fp8 + fused kernels: close, not equal


@pytest.mark.parametrize("mode", ["model-offload", "group-offload"])
@pytest.mark.parametrize("quantization", ["int8", "fp8"])
def test_quantized_transformer_streams(tiny_weights, full_bf16, mode, quantization):
    """torchao's int8/fp8 weights moved by the offload hooks (group-offload quantizes them in CPU memory, then
    pins and streams them); int4 is refused with these modes (tests/test_quantization.py)."""
    pytest.importorskip("torchao")
    if quantization == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9 (Ada, Hopper)")
    from pipelines.runtime import RuntimeOptions

    editor = load_editor(tiny_weights, options=RuntimeOptions(memory_mode=mode, quantization=quantization))
    assert editor.capabilities().as_dict()["memory"]["quantization"] == quantization
    image = _edit(editor)
    assert image.shape == full_bf16.shape and image.std() > 0


@pytest.mark.parametrize(
    ("mode", "quantization"), [("full", "none"), ("group-offload", "none"), ("full", "int8"), ("full", "fp8")]
)
def test_request_loras_on_cuda(tiny_weights, tmp_path, mode, quantization):
    """A request LoRA (pipelines.loras) on the GPU in bf16, on a transformer streamed by group offload, and on
    torchao-quantized weights: it changes the image, scale 0 is the base image, and the base image after it is
    the fresh model's."""
    from pipelines.loras import LoraFile, sha256_of
    from pipelines.runtime import RuntimeOptions
    from tests.lora_files import write_lora

    if quantization == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9 (Ada/Hopper)")
    editor = load_editor(tiny_weights, options=RuntimeOptions(memory_mode=mode, quantization=quantization))
    path = write_lora(tmp_path / "style.safetensors", tiny_weights, "bfl", seed=1)
    lora = LoraFile(sha256_of(path), path, 1.0, 0)
    base = _edit(editor, profile="edit", num_inference_steps=4)
    with_lora = _edit(editor, profile="edit", num_inference_steps=4, loras=(lora,))
    assert np.abs(with_lora.astype(int) - base).mean() > 0.5
    zero = LoraFile(lora.digest, lora.path, 0.0, 0)
    assert np.array_equal(_edit(editor, profile="edit", num_inference_steps=4, loras=(zero,)), base)
    assert np.array_equal(_edit(editor, profile="edit", num_inference_steps=4), base)
