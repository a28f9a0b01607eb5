"""fal's three edit endpoints: id (also the route path), input schema, and the profile that runs them."""

from __future__ import annotations

from dataclasses import dataclass

from server.schemas import Flux2EditInput, Flux2FastEditInput

APP_PATH = "fal-ai/flux-2"  # fal's owner/alias; the queue's request URLs live under it


@dataclass(frozen=True)
class Endpoint:
    endpoint_id: str
    input_model: type[Flux2EditInput | Flux2FastEditInput]
    profile: str  # key into pipelines.PROFILES
    summary: str


ENDPOINTS = (
    Endpoint("fal-ai/flux-2/edit", Flux2EditInput, "edit", "FLUX.2 [dev] edit: full quality, configurable steps"),
    Endpoint("fal-ai/flux-2/turbo/edit", Flux2FastEditInput, "turbo", "FLUX.2 [dev] Turbo edit: 8 steps"),
    Endpoint("fal-ai/flux-2/flash/edit", Flux2FastEditInput, "flash", "FLUX.2 [dev] Flash edit: 4 steps"),
)
BY_ID = {e.endpoint_id: e for e in ENDPOINTS}
