"""Weight quantization of FLUX.2's transformer and text encoder, with torchao.

Which layers (`transformer_layer_filter`): only the linear layers inside the repeated blocks
(`transformer_blocks.*`, `single_transformer_blocks.*`: attention projections and feed-forwards, 31.4 B of the
transformer's 32.2 B parameters). The layers outside them stay in the compute dtype, as NVIDIA's and ModelOpt's
FLUX recipes leave them: the embedders (`x_embedder`, `context_embedder`, `time_guidance_embed.*`), the shared
modulation MLPs (`double_stream_modulation_img/txt`, `single_stream_modulation`: one row per image, M = 1, where
a quantized matmul saves nothing and its error reaches every block), `norm_out` and `proj_out` (the last layer,
whose error lands directly in the predicted velocity). 0.82 B parameters, 1.5 GiB in bf16. int8 and int4 use
the same filter: the same layers are the sensitive ones whatever the number format, and 0.8 GiB is little next
to the 15-30 GiB of quantized blocks. A distilled adapter's low-rank matrices (peft's `lora_A`/`lora_B`) stay in
the compute dtype too.

The formats:
- `int8`: torchao int8 weight-only (`Int8WeightOnlyConfig`); runs on the CPU and on any CUDA GPU.
- `fp8`: torchao float8 weights and dynamic float8 activations, per-row scales
  (`Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`); Ada/Hopper/Blackwell (compute capability
  >= 8.9). torchao refuses to build it on a machine without such a GPU, wherever the weights are.
- `int4`: 4-bit weight-only, groups of 128. On CUDA, torchao's tinygemm layout
  (`Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")`, bf16 only, made on the GPU); on the CPU,
  torchao's `PrototypeInt4WeightOnlyConfig` (`Int4OpaqueTensor`, `_weight_int4pack_mm_for_cpu`), so the 4-bit
  path runs in CI on the tiny model. Why not the others: torchao 0.18's default `Int4WeightOnlyConfig()` packing
  (`plain`) needs the `mslk` package, which PyPI has only as an empty placeholder (ImportError); bitsandbytes nf4
  (diffusers' FLUX.2 docs) works, now with a CPU backend too, but is a 43 MB wheel with a CUDA library per CUDA
  version, quantizes inside `from_pretrained` (another load path), and is one more dependency, where torchao is
  already the one for int8/fp8. The tinygemm weights are created on the GPU and are not moved back to the CPU,
  so int4 runs with the transformer resident (`full`, `multi-gpu`, `offload-text-encoder`) and is refused with
  `model-offload` and `group-offload` (`check_quantization`).

The text encoder (`quantize_text_encoder`): weight-only int8 or fp8 of the Mistral decoder's linear layers
(`model.language_model.layers.*`); the embeddings, `lm_head` and the vision tower stay as loaded.

Where quantization runs (`quantization_device`): torchao moves each selected layer to that device, quantizes it
there and leaves the whole module there. On the GPU that keeps the peak at the quantized weights plus one bf16
layer, so a transformer that fits the GPU only quantized can still be quantized there from CPU memory.
"""

from __future__ import annotations

import torch

TRANSFORMER_QUANTIZATIONS = ("none", "int8", "fp8", "int4")
TEXT_ENCODER_QUANTIZATIONS = ("none", "int8", "fp8")
TRANSFORMER_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")  # Flux2Transformer2DModel's repeats
TEXT_ENCODER_LAYERS = ".language_model.layers."  # Mistral3ForConditionalGeneration's decoder layers
INT4_GROUP_SIZE = 128  # every in-feature count of FLUX.2 [dev]'s blocks is a multiple of it
STREAMING_MODES = ("model-offload", "group-offload")  # the transformer lives in CPU memory between uses


class QuantizationError(ValueError):
    """A quantization this machine, memory mode or dtype cannot run, said plainly at start-up."""


def transformer_layer_filter(module: torch.nn.Module, fqn: str) -> bool:
    """True for the transformer layers that are quantized: base linear layers of the repeated blocks."""
    return isinstance(module, torch.nn.Linear) and fqn.startswith(TRANSFORMER_BLOCKS) and ".lora_" not in f".{fqn}"


def text_encoder_layer_filter(module: torch.nn.Module, fqn: str) -> bool:
    """True for the text encoder's quantized layers: the decoder layers' attention and MLP projections."""
    return isinstance(module, torch.nn.Linear) and TEXT_ENCODER_LAYERS in f".{fqn}"


def transformer_config(quantization: str, device: str | torch.device, int4_group_size: int = INT4_GROUP_SIZE):
    """The torchao configuration of a transformer quantization for weights quantized on `device`."""
    device_type = torch.device(device).type
    if quantization == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig()
    if quantization == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    if quantization == "int4":
        if device_type == "cpu":
            from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

            return PrototypeInt4WeightOnlyConfig(group_size=int4_group_size)
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=int4_group_size, int4_packing_format="tile_packed_to_4d")
    raise QuantizationError(f"unknown quantization {quantization!r}: one of {', '.join(TRANSFORMER_QUANTIZATIONS)}")


def text_encoder_config(quantization: str):
    if quantization == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig()
    if quantization == "fp8":
        from torchao.quantization import Float8WeightOnlyConfig

        return Float8WeightOnlyConfig()
    raise QuantizationError(
        f"unknown text encoder quantization {quantization!r}: one of {', '.join(TEXT_ENCODER_QUANTIZATIONS)}"
    )


def quantize_transformer(
    transformer, quantization: str, device: str | torch.device, int4_group_size: int = INT4_GROUP_SIZE
) -> None:
    """Quantize the transformer's block linear layers in place (`transformer_layer_filter`), on `device`.

    `int4_group_size` is for tiny test models, whose layers are narrower than 128 (int4 leaves a layer whose
    in-features are not a multiple of the group size in the compute dtype)."""
    if quantization == "none":
        return
    from torchao.quantization import quantize_

    config = transformer_config(quantization, device, int4_group_size)
    quantize_(transformer, config, filter_fn=transformer_layer_filter, device=device)


def quantize_text_encoder(text_encoder, quantization: str, device: str | torch.device) -> None:
    """Weight-only int8/fp8 of the text encoder's decoder linear layers, in place, on `device`."""
    if quantization == "none":
        return
    from torchao.quantization import quantize_

    quantize_(text_encoder, text_encoder_config(quantization), filter_fn=text_encoder_layer_filter, device=device)


def quantization_device(plan, component: str) -> str:
    """Where `apply_memory_plan` quantizes `component` ("transformer" or "text_encoder") for `plan`: on the
    device it computes on where it stays resident, else in CPU memory (streamed: it is moved layer by layer)."""
    if component == "transformer":
        return "cpu" if plan.mode == "group-offload" else plan.device
    if plan.mode == "full":
        return plan.device
    if plan.mode == "multi-gpu":
        return plan.text_encoder_device or plan.device
    return "cpu"  # offload-text-encoder, model-offload, group-offload: the encoder lives in CPU memory


def check_quantization(
    plan, dtype: torch.dtype | None = None, fp8_ok: bool | None = None, need_torchao: bool = True
) -> None:
    """Refuse, before loading, a quantization this machine, memory mode or dtype cannot run (`fp8_ok`: whether
    the plan's device runs fp8; default: asks CUDA; `need_torchao` False: the plan is for simulated hardware, so
    whether torchao is installed here does not matter)."""
    quantization = plan.quantization
    text_encoder = getattr(plan, "text_encoder_quantization", "none")
    if quantization not in TRANSFORMER_QUANTIZATIONS:
        raise QuantizationError(
            f"unknown quantization {quantization!r}: use one of {', '.join(TRANSFORMER_QUANTIZATIONS)}"
        )
    if text_encoder not in TEXT_ENCODER_QUANTIZATIONS:
        raise QuantizationError(
            f"unknown text encoder quantization {text_encoder!r}: use one of {', '.join(TEXT_ENCODER_QUANTIZATIONS)}"
        )
    if quantization == "none" and text_encoder == "none":
        return
    on_cuda = plan.device.startswith("cuda")
    if quantization == "fp8" and not (fp8_capable(plan.device) if fp8_ok is None else fp8_ok):
        raise QuantizationError(
            "fp8 quantization needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell)"
        )
    if quantization == "int4" and plan.mode in STREAMING_MODES:
        raise QuantizationError(
            f"int4 quantization does not run with memory mode {plan.mode!r}: torchao's int4 weights are packed for "
            "the GPU's tinygemm kernel on the GPU and are not moved back to CPU memory, which this mode does with "
            "the transformer; use offload-text-encoder (an int4 transformer of FLUX.2 [dev] is 15 GiB) or int8"
        )
    if quantization == "int4" and on_cuda and dtype is not None and dtype != torch.bfloat16:
        raise QuantizationError(f"int4 quantization on CUDA needs bfloat16 weights (tinygemm), not {dtype}")
    if not need_torchao:
        return
    try:
        import torchao  # noqa: F401
    except ImportError as exc:
        raise QuantizationError("quantization needs torchao: pip install 'flux2-server[gpu]'") from exc


def fp8_capable(device: str) -> bool:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(torch.device(device)) >= (8, 9)


def quantized_layers(model: torch.nn.Module) -> dict[str, str]:
    """{layer name: weight class} of every linear layer whose weight is a torchao tensor (for tests, /health)."""
    return {
        name: type(m.weight).__name__
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and type(m.weight) not in (torch.Tensor, torch.nn.Parameter)
    }
