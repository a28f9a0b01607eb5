"""fal's synchronous edit endpoints: POST /fal-ai/flux-2/edit, /fal-ai/flux-2/turbo/edit, /fal-ai/flux-2/flash/edit."""

import time
import uuid

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.endpoints import ENDPOINTS, Endpoint
from server.errors import outcome
from server.http.callers import caller
from server.http.context import services
from server.http.responses import MODEL_FAILED, TIMED_OUT, UNAVAILABLE
from server.http.routes.queue import enqueue, result_response, wait_completed
from server.logs import request_id_var
from server.schemas import EditOutput
from server.service.model import ModelState

router = APIRouter(tags=["edit"])


def _add_route(endpoint: Endpoint) -> None:
    async def handler(
        body: endpoint.input_model,  # type: ignore[name-defined]  # FastAPI reads it at run time
        request: Request,
        response: Response,
    ) -> EditOutput | JSONResponse:
        the = services(request)
        if the.model.state is ModelState.ELSEWHERE:  # an API front-end: the request runs on a queue worker
            return result_response(await wait_completed(request, enqueue(request, endpoint, body).id))
        request_id = str(uuid.uuid4())
        request_id_var.set(request_id)
        response.headers["x-fal-request-id"] = request_id
        base_url = the.settings.public_url or str(request.base_url)
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            await the.model.ready()  # requests that arrive while the model loads wait for it; 503 if it failed
            with the.quotas.slot(caller(request), request_id):
                return await the.edits.edit(endpoint.profile, body, base_url, request_id)
        except BaseException as exc:
            error = exc
            raise
        finally:
            the.metrics.job_finished(endpoint.endpoint_id, "sync", outcome(error), time.perf_counter() - started)

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
