"""A tiny FLUX.2 [dev]: the real diffusers/transformers classes with tiny configs and random weights.

Built offline, deterministically (fixed seed), in a couple of seconds, and saved in exactly the layout of
`black-forest-labs/FLUX.2-dev` (see `weights.layout`), so tests and the CPU demo load it through the same code
that loads real weights. Its images are noise-like and its text is gibberish; the mechanics are the real ones.

Constraints the configs keep from the real model:
- the pipeline stacks text-encoder hidden states 10, 20 and 30, so the text model has 30 layers and the
  transformer's `joint_attention_dim` is 3 x the text hidden size;
- the transformer's `in_channels` is 4 x the VAE's `latent_channels` (2x2 patchified latents);
- the VAE has four blocks, so images are downsampled 8x as in the real VAE (outputs are multiples of 16 px);
- a safety checker: a random ViT classifier with labels normal/nsfw under `safety_checker/`;
- a turbo LoRA (random, rank 4) under `loras/turbo/` in diffusers' LoRA format, like fal's distilled adapter;
- the tokenizer is byte-level BPE (as Mistral's tekken) with Mistral's special tokens and a chat template in
  the Mistral-Small-3.1 format, wrapped in a PixtralProcessor like the real `tokenizer/` component.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SEED = 0
TEXT_HIDDEN = 16
TEXT_LAYERS = 30  # the pipeline reads hidden states (10, 20, 30)
LATENT_CHANNELS = 4

SPECIAL_TOKENS = [
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
]

# Mistral-Small-3.1's message format, reduced to what Flux2Pipeline sends: a system message, user turns whose
# content is a list of text/image parts, and (for prompt expansion) the assistant's reply.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{%- else %}{%- set parts = message['content'] %}{%- endif %}"
    "{%- if message['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{%- for p in parts %}{{ p['text'] }}{%- endfor %}[/SYSTEM_PROMPT]"
    "{%- elif message['role'] == 'user' %}[INST]"
    "{%- for p in parts %}{%- if p['type'] == 'text' %}{{ p['text'] }}{%- else %}[IMG]{%- endif %}{%- endfor %}"
    "[/INST]"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- for p in parts %}{{ p['text'] }}{%- endfor %}{{ eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=131072,
    )


PATCH_SIZE = 8
SPATIAL_MERGE = 2


def _save_processor(directory: Path, tokenizer) -> None:
    """Save the `tokenizer/` component as PixtralProcessor.save_pretrained lays it out.

    transformers 5 only constructs PixtralProcessor when torchvision is installed (the CPU torch wheel this
    project tests on has none), so the three files it would write are written from their parts: the tokenizer
    (with the chat template), the Pixtral image processor's config, and processor_config.json.
    """
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size=PATCH_SIZE).save_pretrained(directory)
    processor_config = {
        "processor_class": "PixtralProcessor",
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": SPATIAL_MERGE,
        "image_token": "[IMG]",
        "image_break_token": "[IMG_BREAK]",
        "image_end_token": "[IMG_END]",
    }
    (directory / "processor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")


def _text_encoder(vocab_size: int, tokenizer):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in ("<s>", "</s>", "<pad>", "[IMG]")}
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": vocab_size,
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 32,
            "num_hidden_layers": TEXT_LAYERS,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1_000_000_000.0,
            "sliding_window": None,
            "bos_token_id": ids["<s>"],
            "eos_token_id": ids["</s>"],
            "pad_token_id": ids["<pad>"],
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "head_dim": 8,
            "image_size": 64,
            "patch_size": PATCH_SIZE,
            "num_channels": 3,
        },
        image_token_index=ids["[IMG]"],
        spatial_merge_size=SPATIAL_MERGE,
        vision_feature_layer=-1,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
    )
    return Mistral3ForConditionalGeneration(config)


def _transformer():
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * TEXT_HIDDEN,
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=True,
    )


def _vae():
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
        # Self-attention at the bottleneck costs O((H*W/64)^2): minutes on a CPU at 2048 px, for nothing a
        # random model needs. The real VAE keeps it; the class and the call path are the same either way.
        mid_block_add_attention=False,
    )


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.2 [dev]'s own scheduler configuration: resolution-dependent (dynamic) shifting.
    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        num_train_timesteps=1000,
        shift=3.0,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    )


def build_tiny(directory: str | Path, seed: int = SEED) -> Path:
    """Build the tiny FLUX.2 into `directory` (created if needed) and return its path."""
    from weights.layout import COMPONENTS, PIPELINE_CLASS, SAFETY_CHECKER_DIR, TINY_MARKER

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer()

    torch.manual_seed(seed)
    models = {
        "scheduler": _scheduler(),
        "text_encoder": _text_encoder(len(tokenizer), tokenizer),
        "transformer": _transformer(),
        "vae": _vae(),
    }
    _randomize_vae_statistics(models["vae"], seed)
    for name, model in models.items():
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(directory / name, safe_serialization=True)
        else:
            model.save_config(directory / name)
    _save_processor(directory / "tokenizer", tokenizer)
    _save_turbo_lora(models["transformer"], directory, seed)
    _save_safety_checker(directory / SAFETY_CHECKER_DIR, seed)

    import diffusers

    model_index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__}
    model_index.update({c.name: [c.library, c.class_name] for c in COMPONENTS})
    (directory / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    (directory / TINY_MARKER).write_text(
        json.dumps({"description": "tiny random-weight FLUX.2 built by flux2-server", "seed": seed}, indent=2) + "\n"
    )
    return directory


LORA_RANK = 4


def _save_turbo_lora(transformer, directory: Path, seed: int) -> None:
    """A random LoRA on the tiny transformer, saved where and how the real turbo adapter lives.

    Built with peft (as diffusers' own LoRA training scripts build theirs) on every linear layer of the
    transformer blocks, with non-zero random weights (`init_lora_weights=False`) so that it changes the output,
    and saved with diffusers' `save_lora_weights` (keys `transformer.<module>.lora_A/B.weight`): the server
    loads it through the same `load_lora_weights` path as fal's FLUX.2-dev-Turbo file. Call after the
    transformer is saved: this adds the adapter to it in place.
    """
    from diffusers import Flux2Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from weights.layout import ADAPTERS

    targets = [
        n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and "transformer_blocks" in n
    ]
    torch.manual_seed(seed + 1)
    transformer.add_adapter(
        LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=targets, init_lora_weights=False)
    )
    adapter = ADAPTERS["turbo"]
    Flux2Pipeline.save_lora_weights(
        adapter.path(directory).parent,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        weight_name=adapter.file,
    )


NSFW_BIAS = -8.0


def _save_safety_checker(directory: Path, seed: int) -> None:
    """A tiny random NSFW classifier (ViT, labels normal/nsfw) in transformers' layout, where the checker lives.

    Random weights give logits near zero; the nsfw logit's bias of -8 puts P(nsfw) near 3e-4, so at the default
    threshold (0.5) the demo's outputs are shown, and tests force either verdict through the threshold. A real
    checker (README "Safety checker") is the same kind of directory.
    """
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    torch.manual_seed(seed + 2)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
    )
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([0.0, NSFW_BIAS]))
    model.save_pretrained(directory, safe_serialization=True)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(directory)


def _randomize_vae_statistics(vae, seed: int) -> None:
    """Give the latent batch-norm statistics non-trivial values, as trained weights have (fresh ones are 0/1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=generator) * 0.1)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=generator) + 0.5)
