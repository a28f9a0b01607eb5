"""fal's queue API under /queue (or on a `queue.` host): submit, status, status stream, result, cancel.

URLs follow fal: submit is `POST {queue}/fal-ai/flux-2/edit` (every endpoint alike, `{queue}/fal-ai/flux-2` too:
text to image); a request then lives at
`{queue}/fal-ai/flux-2/requests/{id}` with `/status`, `/status/stream` and `/cancel` below it. fal's clients also
build those paths with the endpoint's own path (`.../fal-ai/flux-2/edit/requests/{id}`); both forms are served.
"""

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Literal
from urllib.parse import urlsplit

import anyio
import httpcore
from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from server.endpoints import APP_PATH, ENDPOINTS, Endpoint
from server.errors import QueueUnavailable, retryable_headers
from server.files.outputs import check_free_space
from server.http.auth import may_see, owner_of
from server.http.callers import caller
from server.http.context import services
from server.http.hosts import echoes_host, public_base
from server.http.json_body import json_body
from server.http.responses import MODEL_FAILED, NOT_FOUND, TIMED_OUT, UNAVAILABLE
from server.logs import set_fal_request_id
from server.net.guard import AddressPolicy, AddressRefused
from server.queue.backend import PRIORITIES, SYNC, QueuedRequest
from server.schemas import CancelAnswer, EditInput, EditOutput, Message, Progress, QueueStatus, QueueSubmitted
from server.service.model import ModelState

router = APIRouter(prefix="/queue", tags=["queue"])
STREAM_POLL_S = 0.1
WEBHOOK_RESOLVE_S = 5.0

QUEUE_HOST_FLAG = "flux2.queue_host"
STREAM_RESPONSE = {
    "description": "Server-sent events: `data: <QueueStatus as JSON>` per change, ending at COMPLETED",
    # Before OpenAPI 3.2's itemSchema, an event stream's `schema` describes one event (as OpenAPI 3.2 spells out)
    "content": {
        "text/event-stream": {
            "schema": {
                "type": "object",
                "properties": {
                    "event": {"type": "string"},
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"$ref": "#/components/schemas/QueueStatus"},
                    },
                },
                "required": ["data"],
            }
        }
    },
}


def queue_host_routing(app):
    """ASGI middleware: a request to a `queue.<host>` name for a fal path is a queue request (fal's layout)."""

    async def middleware(scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/fal-ai/"):
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host.startswith("queue."):
                scope = {**scope, "path": "/queue" + scope["path"], QUEUE_HOST_FLAG: True}
        await app(scope, receive, send)

    return middleware


def _queue_url(request: Request) -> str:
    """The base of a queued request's URLs: under a `queue.` Host it answered to, fal's form; else `/queue/...`."""
    if request.scope.get(QUEUE_HOST_FLAG) and echoes_host(request):
        return f"{public_base(request)}/{APP_PATH}"
    return f"{public_base(request)}/queue/{APP_PATH}"


def admit(
    request: Request,
    endpoint: Endpoint,
    body: EditInput | str,
    webhook_url: str | None = None,
    priority: str = "normal",
    start_timeout_s: float | None = None,
    sync: bool = False,
) -> tuple[str, Callable[[], None]]:
    """Refuse a request now (507 low on disk, 503 as configured, 429 over the caller's limit) or give its id and the
    call that queues it (durably). `sync`: its caller awaits it in this process (`Dispatcher.submit_and_wait`,
    which keeps its validated body: the queue's row holds none, nobody would read it back). A `str` body is JSON
    that did not pass the endpoint's schema: queued as it is, it fails with 422 when it runs (fal's queue)."""
    the = services(request)
    check_free_space(the.settings.data_dir, the.settings.min_free_disk_bytes)  # 507: the queue must stay writable
    request_id = str(uuid.uuid4())
    set_fal_request_id(request.scope, request_id)  # a refusal below carries it too
    if the.model.state is ModelState.LOADED and not isinstance(body, str):  # refused now (503), not failed later
        the.edits.check_available(endpoint.profile, body)
    if the.coverage is not None:  # an API front-end: 503 with Retry-After when no live worker serves the profile
        the.coverage.check(endpoint)
    the.quotas.claim(caller(request), request_id, the.store)  # counts until the queue has it COMPLETED

    def add() -> None:
        if sync:  # its body stays with its caller's wait (Dispatcher.submit_and_wait): the row holds none
            stored_input = ""
        else:
            stored_input = body if isinstance(body, str) else body.model_dump_json(exclude_unset=True)
        the.store.add(
            request_id,
            endpoint.endpoint_id,
            stored_input,
            PRIORITIES[priority],
            SYNC if sync else _queue_url(request),
            public_base(request),
            webhook_url,
            start_timeout_s,
            owner_of(request),
        )

    return request_id, add


async def enqueue(
    request: Request,
    endpoint: Endpoint,
    body: EditInput | str,
    webhook_url: str | None = None,
    priority: str = "normal",
    start_timeout_s: float | None = None,
) -> QueuedRequest:
    """Accept a request into the queue and wake the local dispatcher, if any. The embedded queue's insert (and its
    fsync) runs on a thread, the event loop free meanwhile (SQLiteStore serializes its connection behind a lock); a
    shared queue's (Redis) on the event loop, as all its calls."""
    the = services(request)
    request_id, add = admit(request, endpoint, body, webhook_url, priority, start_timeout_s)
    if the.store.distributed:
        add()
    else:
        await asyncio.to_thread(add)
    the.dispatcher.notify()
    return _get(request, request_id)


async def wait_completed(request: Request, request_id: str) -> QueuedRequest:
    """Wait for a queued request to complete, wherever it runs: woken by the queue when it completes
    (`QueueBackend.wait_completed`), checking again at least every second."""
    store = services(request).store
    while True:
        queued = _get(request, request_id)
        if queued.status == "COMPLETED":
            return queued
        await store.wait_completed(request_id, timeout_s=1.0)


async def queued_body(request: Request, endpoint: Endpoint) -> EditInput | str:
    """A submit's body: the endpoint's input if it validates, else its JSON text, queued to fail with 422 when it
    runs (fal's queue accepts any JSON and validates when the request runs). A body that isn't JSON, or holds what
    JSON can't (NaN, a lone surrogate), is a 422 now (`json_body`)."""
    data = await json_body(request)
    try:
        return endpoint.input_model.model_validate(data)
    except ValidationError:
        return json.dumps(data)


async def check_webhook_url(request: Request, url: str) -> None:
    """A 422 now for a webhook URL the SSRF guard refuses (server/net/guard.py), rather than a request whose
    webhook is silently dropped. A host that can't be resolved now is accepted: delivery is retried."""
    try:
        parts = urlsplit(url)
        port = parts.port  # parsed when read: "https://[x" or ":99999" raise here
    except ValueError as exc:
        error = {"type": "url_parsing", "loc": ["query", "fal_webhook"], "msg": f"Not a URL: {exc}", "input": url}
        raise RequestValidationError([error]) from exc
    policy = AddressPolicy.parse(services(request).settings.fetch_allow)
    try:
        with anyio.fail_after(WEBHOOK_RESOLVE_S):
            await policy.resolve(parts.hostname or "", port or (443 if parts.scheme == "https" else 80))
    except AddressRefused as exc:
        error = {"type": "webhook_refused", "loc": ["query", "fal_webhook"], "msg": str(exc), "input": url}
        raise RequestValidationError([error]) from exc
    except (TimeoutError, httpcore.ConnectError, ValueError):
        pass


def _add_submit_route(endpoint: Endpoint) -> None:
    async def submit(
        request: Request,
        fal_webhook: Annotated[
            str | None,
            Query(
                pattern=r"^https?://[^/?#\s]+",
                max_length=2048,
                description="http(s) URL to POST the result to when done (public addresses, or FLUX2_FETCH_ALLOW)",
            ),
        ] = None,
        x_fal_queue_priority: Annotated[Literal["normal", "low"], Header(description="serve order")] = "normal",
        x_fal_request_timeout: Annotated[
            float | None, Header(gt=0.1, description="seconds to start within (over 0.1, as on fal)")
        ] = None,
    ) -> QueueSubmitted:
        if fal_webhook:
            await check_webhook_url(request, fal_webhook)
        body = await queued_body(request, endpoint)
        queued = await enqueue(request, endpoint, body, fal_webhook, x_fal_queue_priority, x_fal_request_timeout)
        position = services(request).store.position(queued)
        return QueueSubmitted(
            request_id=queued.id, gateway_request_id=queued.id, queue_position=position, **queued.urls
        )

    submit.__name__ = "submit_" + endpoint.endpoint_id.replace("/", "_").replace("-", "_")
    router.add_api_route(
        "/" + endpoint.endpoint_id,
        submit,
        methods=["POST"],
        summary=f"Queue: {endpoint.summary}",
        description="The body is validated when the request runs, as on fal: a body that fails the schema is "
        "queued, and its result is the 422. A body that is not JSON is refused now (422).",
        responses=UNAVAILABLE,
        # the body is read by `queued_body`, so its schema is declared here (the sync endpoint's component)
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{endpoint.input_model.__name__}"}}
                },
            }
        },
    )


def _find(request: Request, request_id: str) -> QueuedRequest | None:
    """The request, if this caller may see it (server/http/auth.py: another key's request is as unknown)."""
    set_fal_request_id(request.scope, request_id)
    queued = services(request).store.get(request_id)
    return queued if queued is not None and may_see(request, queued) else None


def _get(request: Request, request_id: str) -> QueuedRequest:
    queued = _find(request, request_id)
    if queued is None:
        raise HTTPException(404, f"Request {request_id} not found")
    return queued


def status_of(request: Request, queued: QueuedRequest, with_logs: bool) -> QueueStatus:
    store = services(request).store
    urls = queued.urls
    logs = store.logs(queued.id) if with_logs else None
    if queued.status == "IN_QUEUE":
        return QueueStatus(status="IN_QUEUE", request_id=queued.id, queue_position=store.position(queued), **urls)
    progress = None
    if queued.progress_step is not None and queued.progress_total is not None:
        progress = Progress(step=queued.progress_step, total=queued.progress_total)
    if queued.status == "IN_PROGRESS":
        return QueueStatus(status="IN_PROGRESS", request_id=queued.id, logs=logs, progress=progress, **urls)
    return QueueStatus(
        status="COMPLETED",
        request_id=queued.id,
        logs=logs,
        progress=progress,
        metrics=queued.metrics or {},
        error=queued.error,
        error_type=queued.error_type,
        **urls,
    )


async def status(request: Request, request_id: str, logs: bool = False) -> JSONResponse:
    """fal answers 202 while a request is queued or running and 200 once it is COMPLETED."""
    current = status_of(request, _get(request, request_id), logs)
    return JSONResponse(current.model_dump(mode="json"), status_code=200 if current.status == "COMPLETED" else 202)


async def status_stream(request: Request, request_id: str, logs: bool = True) -> StreamingResponse:
    """Server-sent events: one `data:` event per change of status (or new log line), ending at COMPLETED; a
    `: keep-alive` comment when nothing changed for FLUX2_STREAM_KEEPALIVE_S. While the queue is unreachable the
    stream waits for it; when the server is stopping it ends (the client follows on with another front-end)."""
    _get(request, request_id)

    keepalive_s = services(request).settings.stream_keepalive_s

    async def events():
        last = None
        sent = time.monotonic()
        while True:
            try:
                current = status_of(request, _get(request, request_id), logs)
            except QueueUnavailable:  # Redis down or restarting: nothing new to say meanwhile
                current = None
            payload = current.model_dump_json() if current is not None else last
            if payload != last:
                yield f"data: {payload}\n\n"
                last, sent = payload, time.monotonic()
            elif time.monotonic() - sent >= keepalive_s:  # a comment line, as fal's stream sends while quiet
                yield ": keep-alive\n\n"
                sent = time.monotonic()
            if current is not None and current.status == "COMPLETED" or await request.is_disconnected():
                return
            if getattr(request.app.state, "stopping", False):  # SIGTERM: end now, don't hold the shutdown
                return
            await asyncio.sleep(STREAM_POLL_S)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def result_response(queued: QueuedRequest) -> JSONResponse:
    headers = {"x-fal-request-id": queued.id}
    if queued.error_type == "request_timeout":
        headers["x-fal-request-timeout-type"] = "user"  # fal's mark: the caller's own start deadline passed
    assert queued.result is not None and queued.status_code is not None, "only a COMPLETED request has a result"
    headers.update(retryable_headers(queued.status_code, queued.error_type))
    return JSONResponse(queued.result, status_code=queued.status_code, headers=headers)


async def result(request: Request, request_id: str) -> JSONResponse:
    queued = _get(request, request_id)
    if queued.status != "COMPLETED":
        return JSONResponse({"detail": "Request is still in progress"}, status_code=400)
    return result_response(served_here(request, queued))


def served_here(request: Request, queued: QueuedRequest) -> QueuedRequest:
    """With a shared queue and no FLUX2_PUBLIC_URL, output URLs under the `/files/` of the front-end that took the
    submit point at this front-end instead (every front-end serves the same shared directory or bucket), so they
    outlive the one that took it. The webhook, sent by the worker, keeps the submitting front-end's."""
    the = services(request)
    images = (queued.result or {}).get("images")
    if the.settings.public_url or not the.store.distributed or not isinstance(images, list):
        return queued
    theirs, ours = queued.files_url.rstrip("/") + "/files/", str(request.base_url).rstrip("/") + "/files/"
    moved = [
        {**image, "url": ours + image["url"].removeprefix(theirs)}
        if isinstance(image, dict) and str(image.get("url", "")).startswith(theirs)
        else image
        for image in images
    ]
    return dataclasses.replace(queued, result={**(queued.result or {}), "images": moved})


async def cancel(request: Request, request_id: str) -> JSONResponse:
    """A queued request is cancelled at once; a running one stops at its next denoising step. fal's answers:
    CANCELLATION_REQUESTED (202), ALREADY_COMPLETED (400), NOT_FOUND (404)."""
    queued = _find(request, request_id)
    if queued is None:
        return JSONResponse(CancelAnswer(status="NOT_FOUND").model_dump(), status_code=404)
    if not services(request).dispatcher.cancel(queued):
        return JSONResponse(CancelAnswer(status="ALREADY_COMPLETED").model_dump(), status_code=400)
    return JSONResponse(CancelAnswer(status="CANCELLATION_REQUESTED").model_dump(), status_code=202)


for _endpoint in ENDPOINTS:
    _add_submit_route(_endpoint)

for _app_path in dict.fromkeys((APP_PATH, *(e.endpoint_id for e in ENDPOINTS))):  # fal-ai/flux-2 is both
    _canonical = _app_path == APP_PATH  # the other forms work the same but are left out of /openapi.json
    _base = f"/{_app_path}/requests/{{request_id}}"
    router.add_api_route(
        _base + "/status",
        status,
        methods=["GET"],
        response_model=QueueStatus,
        responses={202: {"model": QueueStatus, "description": "IN_QUEUE or IN_PROGRESS"}, **NOT_FOUND},
        include_in_schema=_canonical,
    )
    router.add_api_route(
        _base + "/status/stream",
        status_stream,
        methods=["GET"],
        response_class=StreamingResponse,
        responses={200: STREAM_RESPONSE, **NOT_FOUND},
        include_in_schema=_canonical,
    )
    router.add_api_route(
        _base + "/cancel",
        cancel,
        methods=["PUT"],
        status_code=202,
        response_model=CancelAnswer,
        responses={
            400: {"model": CancelAnswer, "description": "ALREADY_COMPLETED"},
            404: {"model": CancelAnswer, "description": "NOT_FOUND: unknown or expired id"},
        },
        include_in_schema=_canonical,
    )
    router.add_api_route(
        _base,
        result,
        methods=["GET"],
        response_model=EditOutput,
        responses={
            400: {"model": Message, "description": "still in progress, or the request's own failure"},
            **NOT_FOUND,
            **MODEL_FAILED,
            **UNAVAILABLE,
            **TIMED_OUT,
        },
        include_in_schema=_canonical,
    )
