"""fal's endpoints served here: id (also the route path), input schema, and the profile that runs them."""

from __future__ import annotations

from dataclasses import dataclass

from server.schemas import Flux2EditInput, Flux2FastEditInput, Flux2LoraEditInput

APP_PATH = "fal-ai/flux-2"  # fal's owner/alias; the queue's request URLs live under it


@dataclass(frozen=True)
class Endpoint:
    endpoint_id: str
    input_model: type[Flux2EditInput | Flux2FastEditInput]
    profile: str  # key into pipelines.PROFILES
    summary: str
    schema_name: str  # fal's name of its input/output schemas, without `Input`/`Output` (fal-js's types too)


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
    # the base profile with up to 3 LoRAs (pipelines.loras); fal-js names its schemas Flux2LoraEditInput/Output
    Endpoint(
        "fal-ai/flux-2/lora/edit",
        Flux2LoraEditInput,
        "edit",
        "FLUX.2 [dev] edit with LoRAs (up to 3): full quality, configurable steps",
        "Flux2LoraEdit",
    ),
)
BY_ID = {e.endpoint_id: e for e in ENDPOINTS}
