"""Tiny LoRA files for the tiny FLUX.2, written at test time in each key format trainers produce.

- `diffusers`: diffusers/peft keys, `transformer.<module>.lora_A.weight` / `lora_B.weight` (diffusers' own training
  scripts, fal's trainer output as diffusers loads it).
- `bfl`: the original BFL module names as ai-toolkit writes them, `diffusion_model.double_blocks.0.img_attn.qkv.
  lora_A.weight` (fused qkv, `img_mlp.0`, `single_blocks.0.linear1`, ...).
- `kohya`: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` / `lora_up.weight` with an `.alpha`.

Shapes come from the tiny transformer's own layers, so the same code would write a (random) LoRA for any FLUX.2
transformer. Weights are seeded random numbers, small enough that the model stays in its working range.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

RANK = 4
STD = 0.25


def transformer_linears(weights: Path) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of the blocks of the model at `weights`."""
    import json

    config = json.loads((weights / "transformer" / "config.json").read_text())
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        model = Flux2Transformer2DModel.from_config(config)
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and "transformer_blocks" in name
    }


def _pair(generator, inputs: int, outputs: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.randn(RANK, inputs, generator=generator) * STD
    b = torch.randn(outputs, RANK, generator=generator) * STD
    return a, b


def diffusers_tensors(weights: Path, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (inputs, outputs) in transformer_linears(weights).items():
        a, b = _pair(generator, inputs, outputs)
        tensors[f"transformer.{name}.lora_A.weight"] = a
        tensors[f"transformer.{name}.lora_B.weight"] = b
    return tensors


def _bfl_layers(weights: Path) -> dict[str, tuple[int, int]]:
    """BFL's names of block 0's layers (double and single stream), with their sizes."""
    linears = transformer_linears(weights)
    double, single = "transformer_blocks.0.", "single_transformer_blocks.0.attn."
    q_in, q_out = linears[double + "attn.to_q"]
    return {
        "double_blocks.0.img_attn.qkv": (q_in, 3 * q_out),
        "double_blocks.0.txt_attn.qkv": (q_in, 3 * q_out),
        "double_blocks.0.img_attn.proj": linears[double + "attn.to_out.0"],
        "double_blocks.0.txt_attn.proj": linears[double + "attn.to_add_out"],
        "double_blocks.0.img_mlp.0": linears[double + "ff.linear_in"],
        "double_blocks.0.img_mlp.2": linears[double + "ff.linear_out"],
        "double_blocks.0.txt_mlp.0": linears[double + "ff_context.linear_in"],
        "double_blocks.0.txt_mlp.2": linears[double + "ff_context.linear_out"],
        "single_blocks.0.linear1": linears[single + "to_qkv_mlp_proj"],
        "single_blocks.0.linear2": linears[single + "to_out"],
    }


def bfl_tensors(weights: Path, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (inputs, outputs) in _bfl_layers(weights).items():
        a, b = _pair(generator, inputs, outputs)
        tensors[f"diffusion_model.{name}.lora_A.weight"] = a
        tensors[f"diffusion_model.{name}.lora_B.weight"] = b
    return tensors


def kohya_tensors(weights: Path, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (inputs, outputs) in _bfl_layers(weights).items():
        a, b = _pair(generator, inputs, outputs)
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = a
        tensors[f"{key}.lora_up.weight"] = b
        tensors[f"{key}.alpha"] = torch.tensor(float(RANK))
    return tensors


FORMATS = {"diffusers": diffusers_tensors, "bfl": bfl_tensors, "kohya": kohya_tensors}


def write_lora(path: Path, weights: Path, fmt: str = "diffusers", seed: int = 0) -> Path:
    """A LoRA for the tiny model at `weights` in format `fmt`, written to `path` (a .safetensors file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(FORMATS[fmt](weights, seed), str(path))
    return path
