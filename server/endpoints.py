"""fal's FLUX.2 [dev] endpoints served here: id (also the route path), input schema, and the profile that runs them.

Two kinds on the same weights and profiles: edit endpoints (their input has `image_urls`: 1-4 reference images) and
text-to-image endpoints (no images). The kind follows from the input model; nothing else tells them apart. The LoRA
endpoints are the base ones with `loras` (pipelines.loras), on the base profile.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.schemas import (
    EditInput,
    Flux2EditInput,
    Flux2FastEditInput,
    Flux2FastTextToImageInput,
    Flux2LoraEditInput,
    Flux2LoraInput,
    Flux2TextToImageInput,
)

APP_PATH = "fal-ai/flux-2"  # fal's owner/alias; the queue's request URLs live under it


@dataclass(frozen=True)
class Endpoint:
    endpoint_id: str
    input_model: type[EditInput]
    profile: str  # key into pipelines.PROFILES
    summary: str
    schema_name: str  # fal's name of its input/output schemas, without `Input`/`Output` (fal-js's types too)

    @property
    def takes_images(self) -> bool:
        """An edit endpoint (reference images in `image_urls`), or text to image (none)."""
        return "image_urls" in self.input_model.model_fields

    @property
    def category(self) -> str:
        """fal's category of the endpoint (its OpenAPI document's `x-fal-metadata`)."""
        return "image-to-image" if self.takes_images else "text-to-image"


ENDPOINTS = (
    Endpoint(
        "fal-ai/flux-2/edit", Flux2EditInput, "edit", "FLUX.2 [dev] edit: full quality, configurable steps", "Flux2Edit"
    ),
    Endpoint(
        "fal-ai/flux-2/turbo/edit", Flux2FastEditInput, "turbo", "FLUX.2 [dev] Turbo edit: 8 steps", "Flux2TurboEdit"
    ),
    Endpoint(
        "fal-ai/flux-2/flash/edit", Flux2FastEditInput, "flash", "FLUX.2 [dev] Flash edit: 4 steps", "Flux2FlashEdit"
    ),
    Endpoint(
        "fal-ai/flux-2",
        Flux2TextToImageInput,
        "edit",
        "FLUX.2 [dev] text to image: full quality, configurable steps",
        "Flux2",
    ),
    Endpoint(
        "fal-ai/flux-2/turbo",
        Flux2FastTextToImageInput,
        "turbo",
        "FLUX.2 [dev] Turbo text to image: 8 steps",
        "Flux2Turbo",
    ),
    Endpoint(
        "fal-ai/flux-2/flash",
        Flux2FastTextToImageInput,
        "flash",
        "FLUX.2 [dev] Flash text to image: 4 steps",
        "Flux2Flash",
    ),
    # the base profile with up to 3 LoRAs (pipelines.loras); fal-js names their schemas Flux2Lora[Edit]Input/Output
    Endpoint(
        "fal-ai/flux-2/lora/edit",
        Flux2LoraEditInput,
        "edit",
        "FLUX.2 [dev] edit with LoRAs (up to 3): full quality, configurable steps",
        "Flux2LoraEdit",
    ),
    Endpoint(
        "fal-ai/flux-2/lora",
        Flux2LoraInput,
        "edit",
        "FLUX.2 [dev] text to image with LoRAs (up to 3): full quality, configurable steps",
        "Flux2Lora",
    ),
)
BY_ID = {e.endpoint_id: e for e in ENDPOINTS}
