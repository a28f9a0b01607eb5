"""Acceleration levels as diffusers cache hooks on the tiny FLUX.2: each level runs and gives a valid image,
`none` stays the plain diffusers call after any number of cached calls, the hooks skip exactly the steps the
spec says, bad specs are refused at start-up, and the server reports the levels truthfully."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from pipelines import EditCall, load_editor
from pipelines.acceleration import Accelerator, parse_spec
from tests.conftest import data_uri, image_bytes

STEPS = 12  # enough steps for both default levels to skip some


@pytest.fixture(scope="module")
def editor(tiny_weights):
    return load_editor(tiny_weights)


def reference() -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(5).integers(0, 256, (96, 128, 3), dtype=np.uint8))


def edit(editor, level: str, steps: int = STEPS, **fields) -> np.ndarray:
    call = EditCall(
        images=[reference()],
        prompt="snow",
        width=256,
        height=192,
        num_inference_steps=steps,
        seed=7,
        acceleration=level,
        **fields,
    )
    return np.asarray(editor.edit(call).images[0])


def test_levels_run_and_none_stays_exact_when_switching(editor):
    never_cached = edit(editor, "none")
    regular = edit(editor, "regular")
    high = edit(editor, "high")
    again = edit(editor, "none")
    regular_again = edit(editor, "regular")

    for image in (regular, high):
        assert image.shape == (192, 256, 3) and image.dtype == np.uint8
        assert image.std() > 0  # a real image, not a blank
    assert np.array_equal(again, never_cached)  # switching back to none is bit-exact
    assert np.array_equal(regular_again, regular)  # a cached level is deterministic too (state reset per call)
    assert not np.array_equal(regular, never_cached)  # the cache did act
    assert not np.array_equal(high, regular)
    assert not editor.pipe.transformer.is_cache_enabled  # nothing left on the model between calls


def test_hooks_skip_exactly_the_planned_steps(editor):
    """The transformer's blocks run on the steps the spec plans and on no other (lite mode skips them whole)."""
    calls = []
    handle = editor.pipe.transformer.transformer_blocks[0].attn.register_forward_hook(lambda *_: calls.append(1))
    try:
        for level in ("none", "regular", "high"):
            calls.clear()
            edit(editor, level)
            skipped = editor.runtime.accelerator.skipped_steps(level, STEPS)
            assert len(calls) == STEPS - len(skipped), level
    finally:
        handle.remove()
    assert editor.runtime.accelerator.skipped_steps("none", STEPS) == []
    assert editor.runtime.accelerator.skipped_steps("regular", 28) == [
        4,
        6,
        7,
        9,
        10,
        12,
        13,
        15,
        16,
        18,
        19,
        21,
        22,
        24,
        25,
    ]
    assert len(editor.runtime.accelerator.skipped_steps("high", 28)) == 19  # 9 full steps of 28


def test_turbo_and_flash_take_no_acceleration(editor):
    with pytest.raises(ValueError, match="base edit profile only"):
        editor.edit(
            EditCall(images=[reference()], prompt="p", width=256, height=256, profile="turbo", acceleration="high")
        )


def test_a_level_that_skips_nothing_is_the_plain_call_and_says_so(editor):
    assert editor.runtime.accelerator.skipped_steps("high", 4) == []
    assert np.array_equal(edit(editor, "high", steps=4), edit(editor, "none", steps=4))
    call = EditCall(images=[reference()], prompt="p", width=256, height=256, num_inference_steps=4, acceleration="high")
    assert editor.edit(call).notices == [
        "Acceleration 'high' skips no step of a 4-step run: the image was generated without acceleration."
    ]
    call.num_inference_steps = STEPS
    assert editor.edit(call).notices == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("fbc:threshold=0.1", "not usable"),
        ("teacache", "unknown acceleration method"),
        ("taylorseer:cache_intervall=3", "unknown setting"),
        ("taylorseer:cache_interval=three", "must be an integer"),
        ("taylorseer:use_lite_mode=maybe", "true or false"),
        ("magcache:threshold=0.1", "mag_ratios"),
        ("magcache:mag_ratios=/nonexistent/ratios.json", "cannot read"),
    ],
)
def test_bad_specs_are_refused_plainly(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)


def test_first_block_cache_fails_on_flux2_in_this_diffusers(editor):
    """Why `fbc` is refused: diffusers' First-Block Cache breaks on FLUX.2's fused single-stream tail. If a
    diffusers upgrade fixes it, this test fails, and FBC can be offered."""
    from diffusers import FirstBlockCacheConfig

    transformer = editor.pipe.transformer
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    try:
        with pytest.raises(TypeError), transformer.cache_context("cond"):
            edit(editor, "none")
    finally:
        transformer._reset_stateful_cache()
        transformer.disable_cache()
    assert edit(editor, "none", steps=4).std() > 0  # the model is whole again


def test_magcache_with_calibrated_ratios_runs(editor, tmp_path):
    ratios = tmp_path / "ratios.json"
    ratios.write_text(json.dumps([1.0] + [0.99] * 27))
    accelerator = Accelerator({"regular": parse_spec(f"magcache:threshold=0.5,mag_ratios={ratios}"), "high": None})
    transformer = editor.pipe.transformer
    calls = []
    handle = transformer.transformer_blocks[0].attn.register_forward_hook(lambda *_: calls.append(1))
    original = editor.runtime.accelerator
    editor.runtime.accelerator = accelerator
    try:
        image = edit(editor, "regular")
    finally:
        editor.runtime.accelerator = original
        handle.remove()
    assert image.shape == (192, 256, 3) and image.std() > 0
    assert len(calls) < STEPS  # MagCache skipped some steps
    assert accelerator.describe()["available"] == ["none", "regular"]


def test_server_refuses_a_bad_acceleration_spec_at_start_up(tiny_weights, tmp_path):
    ran = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--weights", str(tiny_weights), "--data-dir", str(tmp_path)],
        env={**os.environ, "FLUX2_ACCELERATION_HIGH": "fbc:threshold=0.2"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 2
    assert "error: acceleration method 'fbc' is not usable" in ran.stderr


def test_server_edit_with_each_level(server):
    health = server.client.get(f"{server.url}/health").json()["capabilities"]["acceleration"]
    assert health["available"] == ["none", "regular", "high"] and health["profiles"] == ["edit"]
    assert health["levels"]["high"]["method"] == "taylorseer"
    images = {}
    for level in ("none", "regular", "high"):
        body = {
            "prompt": "p",
            "image_urls": [data_uri(image_bytes(96, 96))],
            "image_size": {"width": 512, "height": 512},
            "num_inference_steps": STEPS,
            "seed": 3,
            "acceleration": level,
            "enable_safety_checker": False,
        }
        response = server.post("fal-ai/flux-2/edit", body)
        assert response.status_code == 200, response.text
        assert not any("Acceleration" in n for n in response.json()["notices"])
        images[level] = np.asarray(server.fetch_image(response.json()["images"][0])[1])
        assert images[level].shape == (512, 512, 3)
    assert not np.array_equal(images["none"], images["regular"])


def test_switching_levels_is_exact_in_bf16_too(tiny_weights):
    """The same property in the GPU's dtype, on the CPU: bf16 cached calls leave no trace on `none`."""
    editor = load_editor(tiny_weights, dtype="bfloat16")
    assert editor.dtype == torch.bfloat16
    first = edit(editor, "none", steps=8)
    edit(editor, "high", steps=8)
    assert np.array_equal(edit(editor, "none", steps=8), first)
