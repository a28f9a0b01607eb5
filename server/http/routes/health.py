"""Liveness (/health), readiness (/ready) and what this server can do."""

import dataclasses
import os

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from server.config import RESTARTS_ENV
from server.endpoints import ENDPOINTS
from server.errors import QueueUnavailable
from server.http.auth import has_valid_key
from server.http.context import services
from server.service.model import ModelState
from server.service.replicas import ReplicaRunner

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str = Field(
        description="'ok' while the process serves; 'error' once the model failed to load or the dispatcher "
        "stopped (503)."
    )
    model: str = Field(description="'loading', 'loaded', 'failed', or 'none' on an API front-end (workers run it).")
    error: str | None = Field(None, description="Why the model failed to load.")
    dispatcher_error: str | None = Field(None, description="Why the dispatcher stopped: nothing runs here then.")
    tiny_model: bool = Field(description="Whether this is the tiny random-weight model (its images are noise).")
    queued: int | None = Field(description="Queue requests not started yet (None while the queue is unreachable).")
    waiting: int | None = Field(None, description="Edits handed to the model and not finished (once loaded).")
    capabilities: dict | None = Field(
        None,
        description="What the loaded model can and can't do (once loaded); `endpoints`: each endpoint served, with "
        "its profile, category (image-to-image: edit; text-to-image), whether its profile runs here and whether it "
        "takes `loras`; `loras`: LoRAs per request, kept loaded, the LoRA library, the file size limit.",
    )
    loading: dict | None = Field(
        None,
        description="While the model loads: {stage (read, adapters, place, warm_up, done), component (being read), "
        "bytes_read, bytes_total} (safetensors bytes on disk).",
    )
    replicas: list[dict] | None = Field(
        None,
        description="With --gpus: each replica (one GPU, or a context-parallel group): mode, devices, ready, "
        "restarts, busy.",
    )
    workers: list[dict] = Field(description="Live queue workers, as each advertises itself (heartbeat not expired).")
    queue: dict | None = Field(
        None,
        description="A shared queue (Redis): {reachable}; after Redis came back empty (restarted without persistence, "
        "FLUSHALL, failover to an empty replica) also {reset_at (when it was noticed, Unix time), lost (what)}. "
        "None with the embedded queue.",
    )
    allow_undistilled: bool = Field(description="Whether distilled profiles may run on the base weights.")
    safety_checker_disabled: bool = Field(description="Whether the operator turned the safety checker off.")
    restarts: int = Field(0, description="How often the supervisor started this server again after it died.")


class Readiness(BaseModel):
    ready: bool
    model: str = Field(description="'loading', 'loaded' or 'failed'.")
    error: str | None = None


@router.get("/health", response_model=Health, responses={503: {"model": Health, "description": "Model failed"}})
async def health(request: Request) -> JSONResponse:
    """Liveness: answers as soon as the process serves, while the model loads too; 503 once loading failed or the
    dispatcher stopped. With API keys configured, a caller without one sees no file paths or host names."""
    the = services(request)
    model = the.model.state
    failed = model is ModelState.FAILED or the.dispatcher.died is not None
    try:  # a fixed number of queue calls, whatever the queue holds
        queue, queued, workers = the.store.health(), the.store.queued_count(), the.store.workers()
    except QueueUnavailable:  # this process still serves: /health says the queue is not reachable
        queue, queued, workers = {"reachable": False}, None, []
    answer = Health(
        status="error" if failed else "ok",
        model=model.value,
        error=the.model.error,
        dispatcher_error=the.dispatcher.died,
        tiny_model=the.tiny,
        queued=queued,
        workers=workers,
        queue=queue,
        allow_undistilled=the.settings.allow_undistilled,
        safety_checker_disabled=the.settings.disable_safety_checker,
        restarts=int(os.environ.get(RESTARTS_ENV, "0")),
    )
    progress = the.model.progress
    if model is ModelState.LOADING and progress is not None:
        answer.loading = dataclasses.asdict(progress)
    if model is ModelState.LOADED:
        runner = the.model.runner
        answer.waiting = runner.waiting  # edits submitted to the model and not finished, running included
        caps = runner.editor.capabilities()
        answer.capabilities = {
            **caps.as_dict(),
            "endpoints": {
                e.endpoint_id: {
                    "profile": e.profile,
                    "category": e.category,
                    "runs_here": caps.profiles[e.profile].runs_here,
                    "loras": "loras" in e.input_model.model_fields,  # the LoRA endpoints (pipelines.loras)
                }
                for e in ENDPOINTS
            },
            # request LoRAs: how many per request and kept loaded (the model's), the library and size limit (ours)
            "loras": {
                **caps.loras,
                "library": str(the.settings.lora_dir) if the.settings.lora_dir else None,
                "max_file_bytes": the.settings.max_lora_bytes,
            },
        }
        if isinstance(runner, ReplicaRunner):
            answer.replicas = runner.describe()
    body = answer.model_dump(mode="json")
    if not has_valid_key(request):  # /health is open: where files are and which machines run it are not
        body = without_locations(body)
    return JSONResponse(body, status_code=503 if failed else 200)


LOCATIONS = {"weights", "distilled_adapter_file", "safety_checker_model", "host", "pid", "library"}


def without_locations(value):
    """`value` with file paths and host names (LOCATIONS) set to None, at any depth."""
    if isinstance(value, dict):
        return {k: None if k in LOCATIONS else without_locations(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_locations(v) for v in value]
    return value


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness, "description": "Not ready"}})
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 once the model is loaded and requests run (an API front-end: at once, it only queues); 503
    while it loads (or if loading failed, or the dispatcher stopped: queued requests would never run)."""
    the = services(request)
    model = the.model
    died = the.dispatcher.died
    ready = model.state in (ModelState.LOADED, ModelState.ELSEWHERE) and died is None
    error = model.error or (f"the dispatcher stopped: {died}" if died else None)
    answer = Readiness(ready=ready, model=model.state.value, error=error)
    return JSONResponse(answer.model_dump(), status_code=200 if answer.ready else 503)


class JsonWebKey(BaseModel):
    kty: str = Field(description="'OKP'")
    crv: str = Field(description="'Ed25519'")
    x: str = Field(description="The public key, base64url without padding.")
    kid: str = Field(description="The key's id.")
    use: str = Field(description="'sig'")
    alg: str = Field(description="'EdDSA'")


class JsonWebKeySet(BaseModel):
    keys: list[JsonWebKey]


@router.get("/.well-known/jwks.json", response_model=JsonWebKeySet)
async def jwks(request: Request) -> JSONResponse:
    """The public key webhooks are signed with, as fal publishes its own: point fal's webhook verification here.
    Open (no key), like /health."""
    return JSONResponse(services(request).webhook_signer.jwks(), headers={"Cache-Control": "max-age=3600"})
