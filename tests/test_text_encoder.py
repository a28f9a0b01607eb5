"""The text encoder cut to the layers FLUX.2 reads (pipelines/text_encoder.py): bit-exact prompt embeddings.

The tiny build's encoder has 30 layers, so cutting it to 31 drops nothing; these tests build one with FLUX.2
[dev]'s 40 layers from the tiny config (random weights, same tokenizer), where 31 is a real cut.
"""

from __future__ import annotations

import pytest
import safetensors
import torch

from pipelines.text_encoder import (
    hidden_state_indices,
    is_truncated,
    load_text_encoder,
    text_encoder_layers_needed,
    truncate_text_encoder,
)

PROMPTS = ["a red fox in the snow", "make it night, with a full moon over the hills"]
REAL_LAYERS = 40  # Mistral-Small 3.x, FLUX.2 [dev]'s text encoder


@pytest.fixture(scope="module")
def encoder_40(tiny_weights, tmp_path_factory):
    """A 40-layer text encoder in the tiny model's config, saved untied (as the real one: its own lm_head)."""
    from transformers import AutoConfig, Mistral3ForConditionalGeneration

    config = AutoConfig.from_pretrained(tiny_weights / "text_encoder")
    config.get_text_config().num_hidden_layers = REAL_LAYERS
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(config).eval()
    directory = tmp_path_factory.mktemp("encoder40") / "text_encoder"
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tiny_weights):
    from pipelines.editor import load_tokenizer

    return load_tokenizer(tiny_weights / "tokenizer")


def prompt_embeds(text_encoder, tokenizer, prompt: str) -> torch.Tensor:
    """Exactly what Flux2Pipeline.encode_prompt computes (its own static method)."""
    from diffusers import Flux2Pipeline

    with torch.no_grad():
        return Flux2Pipeline._get_mistral_3_small_prompt_embeds(
            text_encoder, tokenizer, prompt, device=torch.device("cpu")
        )


def test_layers_needed_comes_from_the_pipeline():
    from diffusers import Flux2Pipeline

    assert hidden_state_indices() == (10, 20, 30)  # read from diffusers, not written here
    assert text_encoder_layers_needed() == text_encoder_layers_needed(Flux2Pipeline) == 31
    assert text_encoder_layers_needed((10, 20, 30)) == 31
    assert text_encoder_layers_needed([3, 7]) == 8


def test_31_layers_are_bit_exact_and_30_are_not(encoder_40, tokenizer):
    full = load_text_encoder(encoder_40, torch.float32)
    assert len(full.model.language_model.layers) == REAL_LAYERS and not is_truncated(full)
    expected = [prompt_embeds(full, tokenizer, p) for p in PROMPTS]

    needed = text_encoder_layers_needed()
    cut = truncate_text_encoder(load_text_encoder(encoder_40, torch.float32), needed)
    assert len(cut.model.language_model.layers) == needed and is_truncated(cut)
    assert cut.config.get_text_config().num_hidden_layers == needed
    for prompt, want in zip(PROMPTS, expected):
        assert torch.equal(prompt_embeds(cut, tokenizer, prompt), want)
    dropped = sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in cut.parameters())
    per_layer = sum(p.numel() for p in full.model.language_model.layers[0].parameters())
    assert dropped == (REAL_LAYERS - needed) * per_layer + full.lm_head.weight.numel()

    short = truncate_text_encoder(load_text_encoder(encoder_40, torch.float32), needed - 1)
    assert not torch.equal(prompt_embeds(short, tokenizer, PROMPTS[0]), expected[0])  # index 30 is then normed

    with pytest.raises(ValueError, match="at least one"):
        truncate_text_encoder(full, 0)


def test_an_encoder_with_fewer_layers_than_needed_is_kept_whole_without_lm_head(tiny_weights, tokenizer):
    """The tiny build's 30 layers: hidden state 30 is the final norm's output in both, so 31 keeps all 30."""
    full = load_text_encoder(tiny_weights / "text_encoder", torch.float32)
    cut = load_text_encoder(tiny_weights / "text_encoder", torch.float32, num_layers=text_encoder_layers_needed())
    assert len(cut.model.language_model.layers) == len(full.model.language_model.layers) == 30
    assert is_truncated(cut) and not is_truncated(full)
    assert torch.equal(prompt_embeds(cut, tokenizer, PROMPTS[0]), prompt_embeds(full, tokenizer, PROMPTS[0]))


def test_loading_cut_reads_only_the_layers_kept(encoder_40, tokenizer, monkeypatch):
    """load_text_encoder(num_layers=31) gives the same embeddings as loading all and cutting, and never reads the
    dropped layers' tensors from the safetensors file."""
    import transformers.modeling_utils

    read: list[str] = []
    real_open = safetensors.safe_open

    class Slice:
        def __init__(self, key, inner):
            self.key, self.inner = key, inner

        def __getitem__(self, index):
            read.append(self.key)
            return self.inner[index]

        def __getattr__(self, name):
            return getattr(self.inner, name)

    class Opened:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_slice(self, key):
            return Slice(key, self.inner.get_slice(key))

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(transformers.modeling_utils, "safe_open", Opened)
    needed = text_encoder_layers_needed()
    cut = load_text_encoder(encoder_40, torch.float32, num_layers=needed)
    monkeypatch.undo()
    assert read, "the spy saw the checkpoint being read"
    read_layers = {
        int(key.split("layers.")[1].split(".")[0]) for key in read if ".layers." in key and "vision" not in key
    }
    assert read_layers == set(range(needed))
    assert is_truncated(cut) and len(cut.model.language_model.layers) == needed

    whole_then_cut = truncate_text_encoder(load_text_encoder(encoder_40, torch.float32), needed)
    for prompt in PROMPTS:
        assert torch.equal(prompt_embeds(cut, tokenizer, prompt), prompt_embeds(whole_then_cut, tokenizer, prompt))


def test_load_editor_cuts_the_encoder_as_the_plan_says_and_edits_identically(
    tiny_weights, encoder_40, tmp_path, monkeypatch
):
    """The tiny model with a 40-layer encoder: an editor whose plan keeps 31 layers gives the same image."""
    import dataclasses
    import shutil

    import numpy as np
    import PIL.Image

    from pipelines import EditCall, load_editor, runtime

    weights = shutil.copytree(tiny_weights, tmp_path / "weights")
    shutil.rmtree(weights / "text_encoder")
    shutil.copytree(encoder_40, weights / "text_encoder")
    reference = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    call = EditCall(images=[reference], prompt="make it snow", width=64, height=64, profile="flash", seed=2)

    whole = load_editor(weights, "cpu")
    assert len(whole.pipe.text_encoder.model.language_model.layers) == REAL_LAYERS
    expected = np.asarray(whole.edit(call).images[0])
    del whole
    resolve = runtime.resolve_plan
    monkeypatch.setattr(
        runtime, "resolve_plan", lambda *a, **k: dataclasses.replace(resolve(*a, **k), text_encoder_layers=31)
    )
    cut = load_editor(weights, "cpu")
    assert len(cut.pipe.text_encoder.model.language_model.layers) == 31 and is_truncated(cut.pipe.text_encoder)
    assert cut.capabilities().as_dict()["prompt_expansion"] is False
    assert np.array_equal(np.asarray(cut.edit(call).images[0]), expected)


def test_the_cut_saves_a_fifth_of_the_real_encoder():
    """FLUX.2 [dev]'s Mistral-Small 3.x at its real size, on the meta device (transformers' Mistral3Config defaults,
    with the real checkpoint's own lm_head): 24.0 B parameters, 18.3 B after the cut (10.6 GiB less in bf16)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(tie_word_embeddings=False)
    with torch.device("meta"):
        model = Mistral3ForConditionalGeneration(config)
    whole = sum(p.numel() for p in model.parameters())
    truncate_text_encoder(model, text_encoder_layers_needed())
    saved = whole - sum(p.numel() for p in model.parameters())
    assert round(whole / 1e9, 2) == 24.01
    assert round(saved / 1e9, 2) == 5.67 and round(saved * 2 / 2**30, 1) == 10.6
