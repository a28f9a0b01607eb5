"""Prompt expansion on the tiny model: its text is gibberish, the mechanics are diffusers' caption upsampling.

The tiny text encoder is a real Mistral3ForConditionalGeneration (with a Pixtral vision tower) behind a real
PixtralProcessor, so the reference images reach it as [IMG] patch tokens, and generation samples real tokens.
"""

from __future__ import annotations

import shutil

import pytest

from pipelines.editor import EditCall, load_editor
from pipelines.expansion import expand_prompt
from tests.conftest import data_uri, decode, image_bytes
from tests.test_queue import submit, wait_done

REF = data_uri(image_bytes(96, 96, seed=7))
EXPAND = {"prompt": "Make it snow", "image_urls": [REF], "image_size": "square", "enable_prompt_expansion": True}


@pytest.fixture(scope="module")
def editor(tiny_weights):
    return load_editor(tiny_weights, device="cpu")


def test_expansion_is_a_function_of_prompt_and_seed(editor):
    refs = [decode(image_bytes(96, 96, seed=7)).convert("RGB")]
    first = expand_prompt(editor.pipe, "Make it snow", refs, seed=1)
    assert first and first != "Make it snow"
    assert expand_prompt(editor.pipe, "Make it snow", refs, seed=1) == first  # deterministic per seed
    assert expand_prompt(editor.pipe, "Make it snow", refs, seed=2) != first


def test_the_text_encoder_sees_every_reference(editor, monkeypatch):
    """Two references reach generate() as one concatenated image (diffusers' rule) and its [IMG] tokens."""
    seen = {}
    generate = editor.pipe.text_encoder.generate

    def spy(**inputs):
        seen.update(inputs)
        return generate(**inputs)

    monkeypatch.setattr(editor.pipe.text_encoder, "generate", spy)
    refs = [decode(image_bytes(96, 96, seed=7)).convert("RGB"), decode(image_bytes(64, 128, seed=8)).convert("RGB")]
    expand_prompt(editor.pipe, "Make it snow", refs, seed=1)
    image_tokens = (seen["input_ids"] == editor.pipe.tokenizer.image_token_id).sum().item()
    height, width = seen["image_sizes"][0].tolist()
    patch = editor.pipe.tokenizer.patch_size * editor.pipe.tokenizer.spatial_merge_size
    assert seen["pixel_values"].shape[:2] == (1, 3)
    assert image_tokens == (height // patch) * (width // patch) > 0


def test_the_processor_is_the_real_one(editor):
    processor = editor.pipe.tokenizer
    assert type(processor).__name__ == "PixtralProcessor"
    assert type(processor.image_processor).__name__.startswith("PixtralImageProcessor")
    assert editor.capabilities().prompt_expansion is True


def test_response_prompt_is_the_expanded_one_and_logs_show_it(server):
    out = server.post("fal-ai/flux-2/turbo/edit", {**EXPAND, "seed": 1}).json()
    again = server.post("fal-ai/flux-2/turbo/edit", {**EXPAND, "seed": 1}).json()
    other = server.post("fal-ai/flux-2/turbo/edit", {**EXPAND, "seed": 2}).json()
    plain = server.post("fal-ai/flux-2/turbo/edit", {**EXPAND, "seed": 1, "enable_prompt_expansion": False}).json()
    assert out["prompt"] != "Make it snow" and out["prompt"].strip()
    assert again["prompt"] == out["prompt"]
    assert server.fetch_image(again["images"][0])[0] == server.fetch_image(out["images"][0])[0]
    assert other["prompt"] != out["prompt"]
    assert plain["prompt"] == "Make it snow"
    assert server.fetch_image(plain["images"][0])[0] != server.fetch_image(out["images"][0])[0]
    assert not any("expansion" in n.lower() for n in out["notices"])
    assert "prompt_expansion" in out["timings"]
    assert f"prompt expanded to: {out['prompt']!r}" in server.log()

    done = wait_done(
        server.client, submit(server.client, server.url, "fal-ai/flux-2/turbo/edit", {**EXPAND, "seed": 1})
    )
    assert f"prompt expanded to: {out['prompt']!r}" in [log["message"] for log in done["logs"]]


def test_a_tokenizer_saved_alone_loads_and_says_expansion_is_unavailable(tiny_weights, tmp_path):
    weights = shutil.copytree(tiny_weights, tmp_path / "weights")
    (weights / "tokenizer" / "preprocessor_config.json").unlink()
    (weights / "tokenizer" / "processor_config.json").unlink()
    editor = load_editor(weights, device="cpu")
    assert editor.capabilities().prompt_expansion is False
    refs = [decode(image_bytes(96, 96, seed=7)).convert("RGB")]
    result = editor.edit(EditCall(refs, "Make it snow", 64, 64, profile="flash", expand_prompt=True, seed=1))
    assert result.prompt == "Make it snow"


def plan_with(monkeypatch, **fields):
    """load_editor's plan, with `fields` set as a memory plan would set them."""
    import dataclasses

    from pipelines import runtime

    resolve = runtime.resolve_plan
    monkeypatch.setattr(runtime, "resolve_plan", lambda *a, **k: dataclasses.replace(resolve(*a, **k), **fields))


def test_a_truncated_text_encoder_refuses_expansion_with_its_reason(tiny_weights, monkeypatch):
    """A plan that cuts the encoder (text_encoder_layers) leaves no lm_head to generate with: the editor says so,
    never calls generate, and a request asking for expansion gets the notice with the reason."""
    from server.config import Settings
    from server.schemas import Flux2EditInput
    from server.service.edit import notices_for

    plan_with(monkeypatch, text_encoder_layers=31)
    editor = load_editor(tiny_weights, device="cpu")
    caps = editor.capabilities()
    assert caps.prompt_expansion is False
    assert "cut to the 31 layers" in caps.prompt_expansion_unavailable

    def generate(**inputs):
        raise AssertionError("generate was called on a truncated text encoder")

    monkeypatch.setattr(editor.pipe.text_encoder, "generate", generate)
    refs = [decode(image_bytes(96, 96, seed=7)).convert("RGB")]
    result = editor.edit(EditCall(refs, "Make it snow", 64, 64, profile="flash", expand_prompt=True, seed=1))
    assert result.prompt == "Make it snow" and "prompt_expansion" not in result.timings

    body = Flux2EditInput(prompt="Make it snow", image_urls=[REF], enable_prompt_expansion=True)
    notices = notices_for(body, "edit", caps, Settings())
    assert f"Prompt expansion is not available on this server ({caps.prompt_expansion_unavailable})" in " ".join(
        notices
    )
    assert not notices_for(body.model_copy(update={"enable_prompt_expansion": False}), "edit", caps, Settings())


def test_a_plan_without_expansion_says_so(tiny_weights, monkeypatch):
    plan_with(monkeypatch, prompt_expansion=False, reason="a 24 GB card: the text encoder is quantized to fit")
    caps = load_editor(tiny_weights, device="cpu").capabilities().as_dict()
    assert caps["prompt_expansion"] is False
    assert (
        caps["prompt_expansion_unavailable"]
        == "the memory plan leaves it out: a 24 GB card: the text encoder is quantized to fit"
    )


def test_text_to_image_expansion_shows_the_encoder_no_image(editor, monkeypatch):
    """Without references (text to image) the text encoder gets the prompt alone: no pixels, no [IMG] tokens."""
    seen = {}
    generate = editor.pipe.text_encoder.generate

    def spy(**inputs):
        seen.update(inputs)
        return generate(**inputs)

    monkeypatch.setattr(editor.pipe.text_encoder, "generate", spy)
    expanded = expand_prompt(editor.pipe, "A lighthouse at dusk", [], seed=1)
    assert expanded and expanded != "A lighthouse at dusk"
    assert seen.get("pixel_values") is None
    assert (seen["input_ids"] == editor.pipe.tokenizer.image_token_id).sum().item() == 0
