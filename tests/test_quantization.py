"""pipelines.quantization on the CPU: which layers each format quantizes, the 4-bit path, the text encoder, and
the refusals. fp8 runs here with torchao's hardware check answered as on an H200 (its CPU kernels are the
emulated ones); the CUDA kernels themselves are in test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from pipelines.editor import load_components
from pipelines.memory import MemoryPlan
from pipelines.quantization import (
    QuantizationError,
    check_quantization,
    quantization_device,
    quantize_text_encoder,
    quantize_transformer,
    quantized_layers,
    transformer_config,
)

pytest.importorskip("torchao")

# Flux2Transformer2DModel's linear layers on the tiny config (one double, one single block), split by the filter.
QUANTIZED = {
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.to_k",
    "transformer_blocks.0.attn.to_v",
    "transformer_blocks.0.attn.to_out.0",
    "transformer_blocks.0.attn.add_q_proj",
    "transformer_blocks.0.attn.add_k_proj",
    "transformer_blocks.0.attn.add_v_proj",
    "transformer_blocks.0.attn.to_add_out",
    "transformer_blocks.0.ff.linear_in",
    "transformer_blocks.0.ff.linear_out",
    "transformer_blocks.0.ff_context.linear_in",
    "transformer_blocks.0.ff_context.linear_out",
    "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
    "single_transformer_blocks.0.attn.to_out",
}
KEPT = {  # embedders, M = 1 modulation/timestep MLPs, the output layers: as NVIDIA's and ModelOpt's recipes
    "time_guidance_embed.timestep_embedder.linear_1",
    "time_guidance_embed.timestep_embedder.linear_2",
    "time_guidance_embed.guidance_embedder.linear_1",
    "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.linear",
    "single_stream_modulation.linear",
    "x_embedder",
    "context_embedder",
    "norm_out.linear",
    "proj_out",
}


@pytest.fixture(scope="module")
def components(tiny_weights):
    return load_components(tiny_weights, torch.float32)


def fresh_transformer(tiny_weights, dtype=torch.float32):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel.from_pretrained(
        tiny_weights, subfolder="transformer", torch_dtype=dtype, local_files_only=True
    )


def transformer_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    img, txt = 16, 8
    return {
        "hidden_states": torch.randn(1, img, 16, generator=g, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, txt, 48, generator=g, dtype=dtype),
        "timestep": torch.tensor([0.5], dtype=dtype),
        "guidance": torch.tensor([2.5], dtype=dtype),
        "img_ids": torch.zeros(img, 4),
        "txt_ids": torch.zeros(txt, 4),
        "return_dict": False,
    }


def test_the_tiny_transformers_linear_layers_are_the_pinned_set(tiny_weights):
    linear = {n for n, m in fresh_transformer(tiny_weights).named_modules() if isinstance(m, torch.nn.Linear)}
    assert linear == QUANTIZED | KEPT  # a diffusers that renames a layer fails here first


def test_int8_quantizes_exactly_the_block_layers(tiny_weights):
    transformer = fresh_transformer(tiny_weights)
    inputs = transformer_inputs()
    before = transformer(**inputs)[0]
    quantize_transformer(transformer, "int8", "cpu")
    assert set(quantized_layers(transformer)) == QUANTIZED
    after = transformer(**inputs)[0]
    assert not torch.equal(before, after)
    assert (after - before).abs().mean() < 0.05 * before.abs().mean()


def test_fp8_quantizes_exactly_the_block_layers(tiny_weights, monkeypatch):
    from torchao.quantization import quant_api

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)  # "an Ada/Hopper GPU"
    transformer = fresh_transformer(tiny_weights, torch.bfloat16)
    inputs = transformer_inputs(torch.bfloat16)
    before = transformer(**inputs)[0].float()
    quantize_transformer(transformer, "fp8", "cpu")
    assert quantized_layers(transformer) == dict.fromkeys(QUANTIZED, "Float8Tensor")
    after = transformer(**inputs)[0].float()
    assert (after - before).abs().mean() < 0.1 * before.abs().mean()


def test_fp8_is_refused_by_torchao_without_such_a_gpu(tiny_weights):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only refusal")
    with pytest.raises(AssertionError, match="compute capability"):
        quantize_transformer(fresh_transformer(tiny_weights, torch.bfloat16), "fp8", "cpu")


def test_int4_runs_on_the_cpu_with_the_same_filter(tiny_weights):
    """The CPU's 4-bit layout (Int4OpaqueTensor); group size 32 because the tiny layers are 32-128 wide (a layer
    whose in-features are not a multiple of the group is left alone by torchao, as the tiny x_embedder would be)."""
    transformer = fresh_transformer(tiny_weights)
    inputs = transformer_inputs()
    before = transformer(**inputs)[0]
    quantize_transformer(transformer, "int4", "cpu", int4_group_size=32)
    assert quantized_layers(transformer) == dict.fromkeys(QUANTIZED, "Int4OpaqueTensor")
    after = transformer(**inputs)[0]
    assert (after - before).abs().mean() < 0.2 * before.abs().mean()


def test_int4_configs_per_device():
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import Int4WeightOnlyConfig

    cuda = transformer_config("int4", "cuda:0")
    assert isinstance(cuda, Int4WeightOnlyConfig)
    assert (cuda.int4_packing_format, cuda.group_size) == ("tile_packed_to_4d", 128)  # not `plain`: needs mslk
    assert isinstance(transformer_config("int4", "cpu"), PrototypeInt4WeightOnlyConfig)
    with pytest.raises(QuantizationError, match="unknown quantization"):
        transformer_config("int3", "cpu")


def test_the_default_int4_packing_is_the_one_that_cannot_work():
    """Why the config above names its packing: torchao 0.18's default needs `mslk` (an empty placeholder on PyPI)."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    layer = torch.nn.Sequential(torch.nn.Linear(128, 64, dtype=torch.bfloat16))
    with pytest.raises(ImportError, match="mslk"):
        quantize_(layer, Int4WeightOnlyConfig(group_size=128))


@pytest.mark.parametrize("mode", ["model-offload", "group-offload"])
def test_int4_is_refused_where_the_transformer_lives_in_cpu_memory(mode):
    with pytest.raises(QuantizationError, match=f"int4 quantization does not run with memory mode '{mode}'"):
        check_quantization(MemoryPlan(mode, "cuda:0", quantization="int4"))


def test_int4_on_cuda_needs_bf16_and_runs_resident():
    plan = MemoryPlan("offload-text-encoder", "cuda:0", quantization="int4")
    with pytest.raises(QuantizationError, match="bfloat16"):
        check_quantization(plan, torch.float16)
    check_quantization(plan, torch.bfloat16)
    check_quantization(MemoryPlan("full", "cpu", quantization="int4"), torch.float32)  # the CPU layout


def test_unknown_quantizations_are_refused():
    with pytest.raises(QuantizationError, match="unknown quantization"):
        check_quantization(MemoryPlan("full", "cpu", quantization="nf4"))

    class Plan:  # MemoryPlan with the plan branch's text_encoder_quantization field
        mode, device, quantization, text_encoder_quantization = "full", "cpu", "none", "int4"

    with pytest.raises(QuantizationError, match="unknown text encoder quantization"):
        check_quantization(Plan())


def test_where_each_component_is_quantized():
    def where(mode, component, te_device=None):
        return quantization_device(MemoryPlan(mode, "cuda:0", text_encoder_device=te_device), component)

    assert [where(m, "transformer") for m in ("full", "offload-text-encoder", "model-offload")] == ["cuda:0"] * 3
    assert where("group-offload", "transformer") == "cpu"
    assert where("full", "text_encoder") == "cuda:0"
    assert where("multi-gpu", "text_encoder", "cuda:1") == "cuda:1"
    assert [where(m, "text_encoder") for m in ("offload-text-encoder", "model-offload", "group-offload")] == ["cpu"] * 3


def prompt_embeddings(components, text_encoder) -> torch.Tensor:
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline(**{**components, "text_encoder": text_encoder})
    with torch.no_grad():
        return pipe.encode_prompt(prompt="a red cube on a table", device=torch.device("cpu"))[0]


@pytest.mark.parametrize(
    ("quantization", "weight_class", "min_cosine"), [("int8", "Int8", 0.999), ("fp8", "Float8", 0.99)]
)
def test_text_encoder_quantizes_the_decoder_layers_only(
    tiny_weights, components, quantization, weight_class, min_cosine
):
    from transformers import Mistral3ForConditionalGeneration

    full = prompt_embeddings(components, components["text_encoder"])
    encoder = Mistral3ForConditionalGeneration.from_pretrained(
        tiny_weights / "text_encoder", dtype=torch.float32, local_files_only=True
    )
    decoder = {
        n
        for n, m in encoder.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.language_model.layers.")
    }
    assert len(decoder) == 30 * 7  # q, k, v, o, gate, up, down per layer
    quantize_text_encoder(encoder, quantization, "cpu")
    quantized = quantized_layers(encoder)
    assert set(quantized) == decoder  # not lm_head, not the vision tower or its projector
    assert all(name.startswith(weight_class) for name in quantized.values())
    assert type(encoder.lm_head.weight) is torch.nn.Parameter
    assert type(encoder.model.language_model.embed_tokens.weight) is torch.nn.Parameter
    embeddings = prompt_embeddings(components, encoder)
    assert embeddings.shape == full.shape and not torch.equal(embeddings, full)
    cosine = torch.nn.functional.cosine_similarity(embeddings.flatten(), full.flatten(), dim=0)
    assert cosine > min_cosine  # NaN fails too


def test_fp8_text_encoder_config_is_weight_only():
    from torchao.quantization import Float8WeightOnlyConfig

    from pipelines.quantization import text_encoder_config

    assert isinstance(text_encoder_config("fp8"), Float8WeightOnlyConfig)
    with pytest.raises(QuantizationError):
        text_encoder_config("int4")


def test_auto_never_streams_an_int4_transformer():
    """Where nothing fits resident, `auto` streams the transformer's plain weights, never int4 (which those modes
    refuse); quantized weights streamed (int8/fp8) only where configured, until a GPU run shows torchao's tensors
    survive pinning and streaming (tests/test_gpu.py::test_quantized_transformer_streams)."""
    from pipelines.memory import ComponentSizes, GiB, choose_memory_mode

    flux2_dev = ComponentSizes(transformer=int(60 * GiB), text_encoder=int(44.7 * GiB), vae=int(0.16 * GiB))
    plan = choose_memory_mode([12 * GiB], flux2_dev, reserve_bytes=4 * GiB, quantization="auto")
    assert (plan.mode, plan.quantization) == ("group-offload", "none")
    check_quantization(plan)
    with pytest.raises(QuantizationError, match="int4"):  # asked for explicitly: refused, not silently changed
        check_quantization(choose_memory_mode([12 * GiB], flux2_dev, reserve_bytes=4 * GiB, quantization="int4"))
