"""Liveness (/health), readiness (/ready) and what this server can do."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str = Field(description="'ok' while the process serves; 'error' once the model failed to load (503).")
    model: str = Field(description="'loading', 'loaded', 'failed', or 'none' on an API front-end (workers run it).")
    error: str | None = Field(None, description="Why the model failed to load.")
    tiny_model: bool = Field(description="Whether this is the tiny random-weight model (its images are noise).")
    queued: int = Field(description="Queue requests not started yet.")
    waiting: int | None = Field(None, description="Edits handed to the model and not finished (once loaded).")
    capabilities: dict | None = Field(None, description="What the loaded model can and can't do (once loaded).")
    workers: list[dict] = Field(description="Live queue workers, as each advertises itself (heartbeat not expired).")
    allow_undistilled: bool = Field(description="Whether distilled profiles may run on the base weights.")
    safety_checker_disabled: bool = Field(description="Whether the operator turned the safety checker off.")


class Readiness(BaseModel):
    ready: bool
    model: str = Field(description="'loading', 'loaded' or 'failed'.")
    error: str | None = None


def model_state(state) -> str:
    if state.front_end:
        return "none"
    if state.model_loaded.is_set():
        return "loaded"
    return "failed" if state.model_error else "loading"


@router.get("/health", response_model=Health, responses={503: {"model": Health, "description": "Model failed"}})
async def health(request: Request) -> JSONResponse:
    """Liveness: answers as soon as the process serves, while the model loads too; 503 once loading failed."""
    state = request.app.state
    model = model_state(state)
    answer = Health(
        status="error" if model == "failed" else "ok",
        model=model,
        error=state.model_error,
        tiny_model=state.tiny,
        queued=state.store.queued_count(),
        workers=state.store.workers(),
        allow_undistilled=state.settings.allow_undistilled,
        safety_checker_disabled=state.settings.disable_safety_checker,
    )
    if model == "loaded":
        answer.waiting = state.worker.waiting  # edits submitted to the model and not finished, running included
        answer.capabilities = state.worker.editor.capabilities()
    return JSONResponse(answer.model_dump(mode="json"), status_code=503 if model == "failed" else 200)


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness, "description": "Not ready"}})
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 once the model is loaded and requests run (an API front-end: at once, it only queues); 503
    while it loads (or if loading failed)."""
    state = request.app.state
    model = model_state(state)
    answer = Readiness(ready=model in ("loaded", "none"), model=model, error=state.model_error)
    return JSONResponse(answer.model_dump(), status_code=200 if answer.ready else 503)
