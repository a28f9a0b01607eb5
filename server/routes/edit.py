"""fal's synchronous edit endpoints: POST /fal-ai/flux-2/edit, /fal-ai/flux-2/turbo/edit, /fal-ai/flux-2/flash/edit."""

import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Request, Response

from server.editing import run_edit
from server.schemas import EditOutput, Flux2EditInput, Flux2FastEditInput


@dataclass(frozen=True)
class Endpoint:
    endpoint_id: str  # fal's model id, also the route path
    input_model: type
    profile: str  # key into pipelines.PROFILES
    summary: str


ENDPOINTS = (
    Endpoint("fal-ai/flux-2/edit", Flux2EditInput, "edit", "FLUX.2 [dev] edit: full quality, configurable steps"),
    Endpoint("fal-ai/flux-2/turbo/edit", Flux2FastEditInput, "turbo", "FLUX.2 [dev] Turbo edit: 8 steps"),
    Endpoint("fal-ai/flux-2/flash/edit", Flux2FastEditInput, "flash", "FLUX.2 [dev] Flash edit: 4 steps"),
)

router = APIRouter(tags=["edit"])


def _add_route(endpoint: Endpoint) -> None:
    async def handler(body: endpoint.input_model, request: Request, response: Response) -> EditOutput:
        request_id = str(uuid.uuid4())
        response.headers["x-fal-request-id"] = request_id
        base_url = request.app.state.settings.public_url or str(request.base_url)
        return await run_edit(request.app.state, endpoint.profile, body, base_url, request_id)

    handler.__name__ = endpoint.profile + "_edit"
    router.add_api_route(
        "/" + endpoint.endpoint_id,
        handler,
        methods=["POST"],
        response_model=EditOutput,
        summary=endpoint.summary,
        operation_id=endpoint.endpoint_id.replace("/", "_").replace("-", "_"),
    )


for _endpoint in ENDPOINTS:
    _add_route(_endpoint)
