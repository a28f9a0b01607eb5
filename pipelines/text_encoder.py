"""The text encoder cut to what FLUX.2 reads: decoder layers [0, N) and no `lm_head`.

`Flux2Pipeline` encodes a prompt with one forward pass of its Mistral 3 text encoder (`output_hidden_states=True`)
and stacks the hidden states at `text_encoder_out_layers` (10, 20, 30): nothing after them, and never the logits.
Hidden state k is the output of decoder layer k - 1 (0 is the embeddings), except the last one, which is the final
norm's output. So an encoder keeping layers [0, max(k) + 1) gives the same hidden states at those indices: with
31 of FLUX.2 [dev]'s 40 layers the prompt embeddings are bit-identical (with 30, index 30 would be the normed
last one). That drops 9 layers and `lm_head` (5.67 B of 24 B parameters: 10.6 GiB in bf16, ~22 % of the encoder's
compute). Prompt expansion (`generate`) needs the whole encoder, so it is unavailable on a truncated one.

`load_text_encoder` reads only the layers kept (transformers skips checkpoint tensors the model has no place for);
`lm_head` is still read (transformers has no switch to leave one module out) and dropped right after.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def hidden_state_indices(pipe=None) -> tuple[int, ...]:
    """The text-encoder hidden states FLUX.2 reads: `encode_prompt`'s default `text_encoder_out_layers`."""
    if pipe is None:
        from diffusers import Flux2Pipeline

        pipe = Flux2Pipeline
    default = inspect.signature(pipe.encode_prompt).parameters["text_encoder_out_layers"].default
    return tuple(default)


def text_encoder_layers_needed(pipe_or_indices=None) -> int:
    """How many decoder layers give the hidden states FLUX.2 reads exactly (31 for FLUX.2's (10, 20, 30)).

    `pipe_or_indices`: a Flux2Pipeline (instance or class; None: diffusers' Flux2Pipeline), or the indices."""
    if pipe_or_indices is None or hasattr(pipe_or_indices, "encode_prompt"):
        indices = hidden_state_indices(pipe_or_indices)
    else:
        indices = tuple(pipe_or_indices)
    # hidden state k is layer k - 1's output, unless k is the last index (the final norm's output): keep one more
    return max(indices) + 1


def decoder_layers(text_encoder) -> torch.nn.ModuleList:
    return text_encoder.model.language_model.layers


def truncate_text_encoder(text_encoder, num_layers: int):
    """Keep decoder layers [0, num_layers) and replace `lm_head` by an identity (in place; returns the encoder).
    An encoder with no more than `num_layers` layers keeps them all: its hidden states are the same either way.

    `Mistral3ForConditionalGeneration.forward` still calls `lm_head` on the last hidden state: as an identity the
    "logits" are that hidden state (no vocabulary-sized projection, no weights), which `encode_prompt` ignores."""
    layers = decoder_layers(text_encoder)
    if num_layers < 1:
        raise ValueError(f"a text encoder needs at least one decoder layer, not {num_layers}")
    num_layers = min(num_layers, len(layers))  # an encoder with fewer layers (the tiny one's 30) is kept whole
    del layers[num_layers:]
    text_config = text_encoder.config.get_text_config()
    text_config.num_hidden_layers = num_layers  # MistralModel.forward runs layers[: num_hidden_layers]
    if getattr(text_config, "layer_types", None):
        text_config.layer_types = text_config.layer_types[:num_layers]
    text_encoder.lm_head = torch.nn.Identity()
    return text_encoder


def is_truncated(text_encoder) -> bool:
    return isinstance(text_encoder.lm_head, torch.nn.Identity)


def load_text_encoder(directory: Path, dtype: torch.dtype, num_layers: int | None = None, device_map=None):
    """The text encoder from a local directory, onto `device_map` (transformers' `from_pretrained` argument: a
    device places it whole; None: the CPU); cut to `num_layers` decoder layers when given, without reading the
    layers it drops from disk."""
    from transformers import AutoConfig, Mistral3ForConditionalGeneration

    local = {"local_files_only": True}
    config = AutoConfig.from_pretrained(directory, **local)
    text_config = config.get_text_config()
    total = text_config.num_hidden_layers
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"a text encoder needs at least one decoder layer, not {num_layers}")
        num_layers = min(num_layers, total)
        text_config.num_hidden_layers = num_layers  # the model is built with these; the rest stay on disk
        if getattr(text_config, "layer_types", None):
            text_config.layer_types = text_config.layer_types[:num_layers]
    text_encoder = Mistral3ForConditionalGeneration.from_pretrained(
        directory, config=config, dtype=dtype, device_map=device_map, **local
    )
    if num_layers is not None:
        truncate_text_encoder(text_encoder, num_layers)
        log.info("text encoder: %d of %d decoder layers kept (the rest not read), lm_head dropped", num_layers, total)
    return text_encoder
