"""fal's synchronous edit endpoints: POST /fal-ai/flux-2/edit, /fal-ai/flux-2/turbo/edit, /fal-ai/flux-2/flash/edit."""

import uuid

from fastapi import APIRouter, Request, Response

from server.editing import run_edit
from server.endpoints import ENDPOINTS, Endpoint
from server.routes.queue import enqueue, result_response, wait_completed
from server.schemas import EditOutput

router = APIRouter(tags=["edit"])


def _add_route(endpoint: Endpoint) -> None:
    async def handler(body: endpoint.input_model, request: Request, response: Response) -> EditOutput:
        if request.app.state.worker is None:  # an API front-end: the request runs on a queue worker
            return result_response(await wait_completed(request, enqueue(request, endpoint, body).id))
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
