"""fal's synchronous endpoints: POST /fal-ai/flux-2/edit, /fal-ai/flux-2/turbo/edit, /fal-ai/flux-2/flash/edit, and
text to image at /fal-ai/flux-2, /fal-ai/flux-2/turbo, /fal-ai/flux-2/flash (every endpoint in server.endpoints).

A sync request is queued like any other and awaited: the dispatcher (server/queue/dispatcher.py) runs it in turn
and hands its output back in this process. With a shared queue (Redis), it runs on whichever worker takes it."""

import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.endpoints import ENDPOINTS, Endpoint
from server.errors import outcome
from server.http.context import services
from server.http.responses import MODEL_FAILED, TIMED_OUT, UNAVAILABLE
from server.http.routes.queue import admit, enqueue, result_response, wait_completed
from server.schemas import EditInput, EditOutput
from server.service.model import ModelState

router = APIRouter(tags=["edit"])


async def call_endpoint(
    request: Request, endpoint: Endpoint, body: EditInput, response: Response
) -> EditOutput | JSONResponse:
    """Run one request of `endpoint` and wait for its output: the sync path of every caller (fal's sync routes, the
    OpenAI images API). Its errors are raised; with a shared queue the recorded answer (output or error) is
    returned as the queue has it."""
    the = services(request)
    if the.model.state is ModelState.ELSEWHERE or the.store.distributed:
        # the request runs wherever a worker takes it from the shared queue; its result comes back through it
        return result_response(await wait_completed(request, enqueue(request, endpoint, body).id))
    started = time.perf_counter()
    try:
        await the.model.ready()  # requests that arrive while the model loads wait for it; 503 if it failed
        request_id, add = admit(request, endpoint, body, sync=True)
    except BaseException as exc:  # refused before it was queued; the dispatcher counts the rest
        the.metrics.job_finished(endpoint.endpoint_id, "sync", outcome(exc), time.perf_counter() - started)
        raise
    response.headers["x-fal-request-id"] = request_id
    return await the.dispatcher.submit_and_wait(request_id, add)


def _add_route(endpoint: Endpoint) -> None:
    async def handler(
        body: endpoint.input_model,  # type: ignore[name-defined]  # FastAPI reads it at run time
        request: Request,
        response: Response,
    ) -> EditOutput | JSONResponse:
        return await call_endpoint(request, endpoint, body, response)

    handler.__name__ = _python_name(endpoint.endpoint_id)
    router.add_api_route(
        "/" + endpoint.endpoint_id,
        handler,
        methods=["POST"],
        response_model=EditOutput,
        responses={**MODEL_FAILED, **UNAVAILABLE, **TIMED_OUT},
        summary=endpoint.summary,
        operation_id=_python_name(endpoint.endpoint_id),
    )


def _python_name(endpoint_id: str) -> str:
    """`fal-ai/flux-2/turbo/edit` -> `fal_ai_flux_2_turbo_edit` (a handler's name, the operation's id)."""
    return endpoint_id.replace("/", "_").replace("-", "_")


for _endpoint in ENDPOINTS:
    _add_route(_endpoint)
