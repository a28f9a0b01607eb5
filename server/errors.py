"""fal's error shape: 422 with a pydantic-style `detail` list for bad input, `{"detail": message}` otherwise."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)


class InputError(Exception):
    """A request field that passed schema validation but can't be used (an image URL that fails, say)."""

    def __init__(self, loc: list[str | int], msg: str, type_: str, input_value: object = None, status: int = 422):
        super().__init__(msg)
        self.status = status
        self.detail = {"loc": ["body", *loc], "msg": msg, "type": type_}
        if input_value is not None:
            self.detail["input"] = input_value


class Unavailable(Exception):
    """This server can't serve the request as configured (a missing adapter, say): a 503 saying what is missing."""


class InferenceError(Exception):
    """The model failed on a request that was valid: a 500 naming the cause."""

    status = 500
    error_type = "inference_error"


class OutOfMemory(InferenceError):
    """The device ran out of memory on this request; the memory was released and the next request can run."""

    error_type = "out_of_memory"


class JobTimedOut(InferenceError):
    """The job ran past FLUX2_JOB_TIMEOUT_S and was stopped at its next step."""

    status = 504
    error_type = "job_timeout"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse({"detail": [exc.detail]}, status_code=exc.status)

    @app.exception_handler(Unavailable)
    async def _unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.exception_handler(InferenceError)
    async def _inference_error(request: Request, exc: InferenceError) -> JSONResponse:
        log.error("inference failed for %s: %s", request.url.path, exc, exc_info=exc.__cause__)
        return JSONResponse({"detail": f"Inference failed: {exc}"}, status_code=exc.status)

    # Last resort, for faults outside the model. Starlette sends this response, then re-raises to the server.
    @app.exception_handler(Exception)
    async def _server_fault(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request to %s failed", request.url.path)
        return JSONResponse({"detail": f"Internal server error: {type(exc).__name__}: {exc}"}, status_code=500)
