"""fal's synchronous endpoints: POST /fal-ai/flux-2/edit, /fal-ai/flux-2/turbo/edit, /fal-ai/flux-2/flash/edit, and
text to image at /fal-ai/flux-2, /fal-ai/flux-2/turbo, /fal-ai/flux-2/flash (every endpoint in server.endpoints).

A sync request is queued like any other and awaited: the dispatcher (server/queue/dispatcher.py) runs it in turn
and hands its output back in this process; if the model is idle, its inputs are prepared from the body validated
here while the queue stores it (a head start: `Dispatcher.submit_and_wait`). With a shared queue (Redis), it runs on
whichever worker takes it first (this process's own model included, if it has one), and the caller is woken by the
queue's completion message.

A caller that disconnects cancels its request (queued: at once; running: at its next step), and a wait is bounded by
FLUX2_SYNC_TIMEOUT_S (504, the request cancelled): no model time is spent for no one."""

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.endpoints import ENDPOINTS, Endpoint
from server.errors import RequestCancelled, SyncWaitTimedOut, outcome
from server.http.context import services
from server.http.hosts import public_base
from server.http.responses import MODEL_FAILED, TIMED_OUT, UNAVAILABLE
from server.http.routes.queue import admit, enqueue, result_response, wait_completed
from server.schemas import EditInput, EditOutput
from server.service.model import ModelState

router = APIRouter(tags=["edit"])
log = logging.getLogger(__name__)
T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (its body was read already: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def await_sync(request: Request, request_id: str, result: Awaitable[T]) -> T:
    """`result` (the sync call's outcome), unless the caller disconnects first or FLUX2_SYNC_TIMEOUT_S passes: then
    its request is cancelled (queued: at once; running: at its next step) and RequestCancelled (nobody reads it) or
    SyncWaitTimedOut (504) raised."""
    the = services(request)
    waiting = asyncio.ensure_future(result)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait(
            {waiting, gone}, timeout=the.settings.sync_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if waiting in done:
            return waiting.result()
        queued = the.store.get(request_id)
        if queued is not None:
            the.dispatcher.cancel(queued)
        if gone in done:
            log.info("request %s: its sync caller went away; the request was cancelled", request_id)
            raise RequestCancelled("The caller disconnected: the request was cancelled")
        raise SyncWaitTimedOut(the.settings.sync_timeout_s)
    finally:
        gone.cancel()
        waiting.cancel()


async def call_endpoint(
    request: Request, endpoint: Endpoint, body: EditInput, response: Response
) -> EditOutput | JSONResponse:
    """Run one request of `endpoint` and wait for its output (`await_sync`: cancelled if the caller goes away, bounded
    by FLUX2_SYNC_TIMEOUT_S): the sync path of every caller (fal's sync routes, the OpenAI images API). Its errors
    are raised; with a shared queue the recorded answer (output or error) is
    returned as the queue has it."""
    the = services(request)
    if the.model.state is ModelState.ELSEWHERE or the.store.distributed:
        # the request runs wherever a worker takes it from the shared queue; its result comes back through it
        request_id = (await enqueue(request, endpoint, body)).id
        return result_response(await await_sync(request, request_id, wait_completed(request, request_id)))
    started = time.perf_counter()
    try:
        await the.model.ready()  # requests that arrive while the model loads wait for it; 503 if it failed
        request_id, add = admit(request, endpoint, body, sync=True)
    except BaseException as exc:  # refused before it was queued; the dispatcher counts the rest
        the.metrics.job_finished(endpoint.endpoint_id, "sync", outcome(exc), time.perf_counter() - started)
        raise
    response.headers["x-fal-request-id"] = request_id
    # with the body validated here: its inputs are prepared at once if the model is idle (a head start)
    waiting = the.dispatcher.submit_and_wait(request_id, add, endpoint.profile, body, public_base(request))
    return await await_sync(request, request_id, waiting)


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
