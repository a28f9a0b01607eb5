"""One error model: each error a request can end in answers the same status and body, and is counted under the
same `outcome` label, whether the request was sync (the HTTP handlers) or queued (the dispatcher)."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import server.http.routes.edit
from pipelines import Cancelled
from server.config import Settings
from server.errors import (
    InferenceError,
    InputError,
    JobTimedOut,
    OutOfMemory,
    TooManyRequests,
    Unavailable,
    answer_for,
)
from server.http.errors import install_error_handlers
from server.process import open_services
from server.queue.dispatcher import MAX_ATTEMPTS
from server.service.edit import EditService
from server.service.metrics import Metrics
from server.service.runner import ModelRunner
from tests.conftest import data_uri, image_bytes
from tests.fake_editor import FakeEditor

BODY = {"prompt": "p", "image_urls": [data_uri(image_bytes(16, 16))]}
ENDPOINT = "fal-ai/flux-2/turbo/edit"

# error -> (status, outcome label), the same on both paths
ERRORS = {
    "input": (InputError(["image_urls", 0], "cannot fetch", "image_load_error"), 422, "image_load_error"),
    "unavailable": (Unavailable("no adapter"), 503, "unavailable"),
    "too_many": (TooManyRequests("slow down", 3), 429, "too_many_requests"),
    "inference": (InferenceError("boom"), 500, "inference_error"),
    "oom": (OutOfMemory("CUDA out of memory"), 500, "out_of_memory"),
    "job_timeout": (JobTimedOut("too long"), 504, "job_timeout"),
    "cancelled": (Cancelled(), 400, "request_cancelled"),
}


def jobs(metrics: Metrics, mode: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "flux2_jobs_total", {"endpoint": ENDPOINT, "mode": mode, "outcome": outcome}
    )
    return value or 0.0


@asynccontextmanager
async def loaded_services(data_dir: Path):
    """The real services of a process, with a model that is "loaded" but never called (the edit is patched)."""
    async with open_services(Settings(data_dir=data_dir), weights_dir=data_dir) as services:
        services.model.loaded(ModelRunner(FakeEditor()))
        yield services


def failing(error: BaseException):
    async def edit(*args, **kwargs):
        raise error

    return edit


def sync_answer(tmp_path, monkeypatch, error: BaseException):
    """POST the sync endpoint of the real route and error handlers, with the model call raising `error`."""
    monkeypatch.setattr(EditService, "edit", failing(error))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with loaded_services(tmp_path) as services:
            app.state.services = services
            dispatching = asyncio.create_task(services.dispatcher.run_forever())  # sync requests run there too
            yield
            services.dispatcher.stop()
            await dispatching

    app = FastAPI(lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(server.http.routes.edit.router)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post(f"/{ENDPOINT}", json=BODY)
        return response, app.state.services.metrics


def queued_answer(tmp_path, monkeypatch, error: BaseException, runs: int = 1):
    """Run one queued request through the real dispatcher (`runs` claims), with the model call raising `error`."""
    monkeypatch.setattr(EditService, "edit", failing(error))

    async def run():
        async with loaded_services(tmp_path) as services:
            store, dispatcher = services.store, services.dispatcher
            store.add("r1", ENDPOINT, json.dumps(BODY), 0, "http://q", "http://f/", None, None)
            for _ in range(runs):
                request = store.claim([ENDPOINT])
                try:
                    await dispatcher._run(request)
                except RuntimeError as exc:  # run_forever's handler: the worker failed on this request
                    dispatcher.crashed(request, f"{type(exc).__name__}: {exc}")
            return store.get("r1"), services.metrics

    return asyncio.run(run())


@pytest.mark.parametrize("name", ERRORS)
def test_each_error_answers_and_counts_the_same_sync_and_queued(name, tmp_path, monkeypatch):
    error, status, label = ERRORS[name]
    response, sync_metrics = sync_answer(tmp_path / "sync", monkeypatch, error)
    queued, queue_metrics = queued_answer(tmp_path / "queue", monkeypatch, error)

    assert (response.status_code, queued.status_code) == (status, status)
    assert response.json() == queued.result
    assert queued.error_type == label
    assert jobs(sync_metrics, "sync", label) == 1
    assert jobs(queue_metrics, "queue", label) == 1
    if isinstance(error, TooManyRequests):
        assert response.headers["retry-after"] == "3"


def test_a_fault_outside_the_model_is_an_internal_error_and_the_queue_runs_it_again(tmp_path, monkeypatch):
    response, metrics = sync_answer(tmp_path / "sync", monkeypatch, RuntimeError("disk on fire"))
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal server error: RuntimeError: disk on fire"}
    assert jobs(metrics, "sync", "internal_error") == 1
    assert answer_for(RuntimeError("x")).error_type == "internal_error"

    queued, metrics = queued_answer(tmp_path / "queue", monkeypatch, RuntimeError("disk on fire"), MAX_ATTEMPTS)
    assert (queued.status, queued.status_code, queued.error_type) == ("COMPLETED", 500, "worker_crashed")
    assert jobs(metrics, "queue", "worker_crashed") == 1
