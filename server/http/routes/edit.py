"""fal's synchronous edit endpoints: POST /fal-ai/flux-2/edit, /fal-ai/flux-2/turbo/edit, /fal-ai/flux-2/flash/edit."""

import time
import uuid

from fastapi import APIRouter, Request, Response

from server.endpoints import ENDPOINTS, Endpoint
from server.errors import Unavailable, outcome
from server.http.quotas import caller
from server.http.responses import MODEL_FAILED, TIMED_OUT, UNAVAILABLE
from server.http.routes.queue import enqueue, result_response, wait_completed
from server.logs import request_id_var
from server.schemas import EditOutput
from server.service.edit import run_edit

router = APIRouter(tags=["edit"])


async def wait_for_model(state) -> None:
    """Requests that arrive while the model loads wait for it; if loading failed, they get a 503 saying why."""
    if not state.model_loaded.is_set() and state.model_error is None:
        await state.model_loaded.wait()
    if state.model_error is not None:
        raise Unavailable(f"The model failed to load: {state.model_error}")


def _add_route(endpoint: Endpoint) -> None:
    async def handler(body: endpoint.input_model, request: Request, response: Response) -> EditOutput:
        state = request.app.state
        if state.front_end:  # an API front-end: the request runs on a queue worker
            return result_response(await wait_completed(request, enqueue(request, endpoint, body).id))
        request_id = str(uuid.uuid4())
        request_id_var.set(request_id)
        response.headers["x-fal-request-id"] = request_id
        base_url = state.settings.public_url or str(request.base_url)
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            await wait_for_model(state)
            with state.quotas.slot(caller(request), request_id):
                return await run_edit(state, endpoint.profile, body, base_url, request_id)
        except BaseException as exc:
            error = exc
            raise
        finally:
            state.metrics.job_finished(endpoint.endpoint_id, "sync", outcome(error), time.perf_counter() - started)

    handler.__name__ = endpoint.profile + "_edit"
    router.add_api_route(
        "/" + endpoint.endpoint_id,
        handler,
        methods=["POST"],
        response_model=EditOutput,
        responses={**MODEL_FAILED, **UNAVAILABLE, **TIMED_OUT},
        summary=endpoint.summary,
        operation_id=endpoint.endpoint_id.replace("/", "_").replace("-", "_"),
    )


for _endpoint in ENDPOINTS:
    _add_route(_endpoint)
