"""Parity: the server's image equals, pixel for pixel, a direct diffusers Flux2Pipeline call on the same weights.

The reference side is built here from diffusers' and transformers' own classes, not from pipelines/, so the
test checks the server's whole path (profiles, sizes, schedule, generator, encoding) against plain diffusers.
Acceleration `none` (or a level that skips no step at that step count) is the plain call; the cached levels are
tested in test_acceleration.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
from transformers import AutoTokenizer, Mistral3ForConditionalGeneration

from tests.conftest import data_uri, decode, image_bytes

# Written out here rather than imported, so a change to the profile table shows up as a failure.
TURBO_SIGMAS = [1.0, 0.6509, 0.4374, 0.2932, 0.1893, 0.1108, 0.0495, 0.00031]
FLASH_SIGMAS = [1.0, 0.4374, 0.1893, 0.0495]


def plain_pipeline(tiny_weights) -> Flux2Pipeline:
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_weights, subfolder="scheduler"),
        vae=AutoencoderKLFlux2.from_pretrained(tiny_weights, subfolder="vae"),
        text_encoder=Mistral3ForConditionalGeneration.from_pretrained(tiny_weights / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(tiny_weights / "tokenizer"),
        transformer=Flux2Transformer2DModel.from_pretrained(tiny_weights, subfolder="transformer"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def plain_diffusers(tiny_weights):
    """{"base": FLUX.2 as loaded, "turbo": FLUX.2 with the turbo LoRA loaded as its model card does}."""
    turbo = plain_pipeline(tiny_weights)
    turbo.load_lora_weights(tiny_weights / "loras" / "turbo", weight_name="flux.2-turbo-lora.safetensors")
    return {"base": plain_pipeline(tiny_weights), "turbo": turbo}


CASES = [
    (
        "fal-ai/flux-2/edit",
        {"num_inference_steps": 6, "image_size": {"width": 512, "height": 640}, "acceleration": "none"},
        6,
        None,
        (512, 640),
    ),
    # size from the 64x96 input; "high" skips no step at 4 steps, so it is the plain call too
    ("fal-ai/flux-2/edit", {"num_inference_steps": 4, "acceleration": "high"}, 4, None, (512, 768)),
    ("fal-ai/flux-2/turbo/edit", {"image_size": "square"}, 8, TURBO_SIGMAS, (512, 512)),
    ("fal-ai/flux-2/flash/edit", {"image_size": "landscape_16_9", "num_images": 2}, 4, FLASH_SIGMAS, (1024, 576)),
]


@pytest.mark.parametrize(("endpoint", "fields", "steps", "sigmas", "size"), CASES)
def test_server_matches_plain_diffusers(server, plain_diffusers, endpoint, fields, steps, sigmas, size):
    refs = [image_bytes(64, 96, seed=3), image_bytes(80, 80, seed=4)]
    request = {
        "prompt": "Make it snow",
        "image_urls": [data_uri(r) for r in refs],
        "seed": 1234,
        "guidance_scale": 3.5,
        **fields,
    }
    response = server.post(endpoint, request)
    assert response.status_code == 200, response.text
    served = [np.asarray(server.fetch_image(i)[1]) for i in response.json()["images"]]

    pipe = plain_diffusers["base" if sigmas is None else "turbo"]  # turbo and flash run the distilled adapter
    expected = pipe(
        image=[decode(r).convert("RGB") for r in refs],
        prompt="Make it snow",
        width=size[0],
        height=size[1],
        num_inference_steps=steps,
        sigmas=sigmas,
        guidance_scale=3.5,
        num_images_per_prompt=fields.get("num_images", 1),
        generator=torch.Generator("cpu").manual_seed(1234),
    ).images
    assert len(served) == len(expected)
    for got, want in zip(served, expected):
        assert got.shape == (size[1], size[0], 3)
        assert np.array_equal(got, np.asarray(want))


@pytest.mark.parametrize(
    ("endpoint", "fields", "steps", "sigmas", "size"),
    [
        ("fal-ai/flux-2", {"num_inference_steps": 5, "acceleration": "none"}, 5, None, (1024, 768)),  # fal's default
        ("fal-ai/flux-2/flash", {"image_size": {"width": 512, "height": 640}}, 4, FLASH_SIGMAS, (512, 640)),
    ],
)
def test_text_to_image_matches_plain_diffusers(server, plain_diffusers, endpoint, fields, steps, sigmas, size):
    """Text to image is Flux2Pipeline called without `image`: the same pixels as plain diffusers."""
    response = server.post(endpoint, {"prompt": "A lighthouse at dusk", "seed": 99, **fields})
    assert response.status_code == 200, response.text
    served = np.asarray(server.fetch_image(response.json()["images"][0])[1])
    expected = plain_diffusers["base" if sigmas is None else "turbo"](
        prompt="A lighthouse at dusk",
        width=size[0],
        height=size[1],
        num_inference_steps=steps,
        sigmas=sigmas,
        guidance_scale=2.5,
        generator=torch.Generator("cpu").manual_seed(99),
    ).images[0]
    assert served.shape == (size[1], size[0], 3)
    assert np.array_equal(served, np.asarray(expected))
