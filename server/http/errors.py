"""The HTTP face of server.errors: every `ServerError` (and, as a last resort, any fault) answered through
`answer_for`, so a sync answer has the same status, body and headers as the queued result of the same error."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.endpoints import ENDPOINTS
from server.errors import InferenceError, ServerError, answer_for
from server.logs import FAL_REQUEST_ID, set_fal_request_id

log = logging.getLogger("server.errors")


def _response(exc: BaseException) -> JSONResponse:
    answer = answer_for(exc)
    return JSONResponse(answer.body, status_code=answer.status, headers=answer.headers or None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    async def _server_error(request: Request, exc: ServerError) -> JSONResponse:
        if isinstance(exc, InferenceError):
            log.error("inference failed for %s: %s", request.url.path, exc, exc_info=exc.__cause__)
        return _response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404 and "route" not in request.scope:  # no route: fal's 404, naming what is served
            served = ", ".join(e.endpoint_id for e in ENDPOINTS)
            detail = f"Path {request.url.path} not found; this server serves {served}"
            return JSONResponse({"detail": detail}, status_code=404)
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid_input(request: Request, exc: RequestValidationError) -> JSONResponse:
        # fal gives a refused call an id too (@fal-ai/client's ApiError.requestId reads it)
        if not request.scope.get(FAL_REQUEST_ID, {}).get("id"):
            set_fal_request_id(request.scope, str(uuid.uuid4()))
        return await request_validation_exception_handler(request, exc)

    # Last resort, for faults outside the model. Starlette sends this response, then re-raises to the server.
    @app.exception_handler(Exception)
    async def _server_fault(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request to %s failed", request.url.path)
        return _response(exc)
