"""One error model: each error a request can end in answers the same status and body, and is counted under the
same `outcome` label, whether the request was sync (the HTTP handlers) or queued (the dispatcher)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import server.http.routes.edit
import server.queue.dispatcher
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
from server.http.quotas import Quotas
from server.queue.dispatcher import Dispatcher
from server.queue.sqlite_queue import RequestStore
from server.service.metrics import Metrics
from tests.conftest import data_uri, image_bytes

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


def fake_state(tmp_path) -> SimpleNamespace:
    loaded = asyncio.Event()
    loaded.set()
    state = SimpleNamespace(
        settings=Settings(data_dir=tmp_path),
        model_loaded=loaded,
        model_error=None,
        front_end=False,
        api_keys=[],
        quotas=Quotas(None, None),
    )
    state.metrics = Metrics(state)
    return state


def failing(error: BaseException):
    async def run_edit(*args, **kwargs):
        raise error

    return run_edit


def sync_answer(tmp_path, monkeypatch, error: BaseException):
    """POST the sync endpoint of the real route and error handlers, with the model call raising `error`."""
    monkeypatch.setattr(server.http.routes.edit, "run_edit", failing(error))
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(server.http.routes.edit.router)
    app.state.__dict__["_state"].update(vars(fake_state(tmp_path)))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post(f"/{ENDPOINT}", json=BODY)
    return response, app.state.metrics


def queued_answer(tmp_path, monkeypatch, error: BaseException):
    """Run one queued request through the real dispatcher, with the model call raising `error`."""
    monkeypatch.setattr(server.queue.dispatcher, "run_edit", failing(error))
    state = fake_state(tmp_path)
    store = RequestStore(tmp_path / "queue.sqlite3")
    store.add("r1", ENDPOINT, json.dumps(BODY), 0, "http://q", "http://f/", None, None)
    dispatcher = Dispatcher(store, state, webhooks=None)
    asyncio.run(dispatcher._run(store.claim([ENDPOINT])))
    queued = store.get("r1")
    store.close()
    return queued, state.metrics


@pytest.mark.parametrize("name", ERRORS)
def test_each_error_answers_and_counts_the_same_sync_and_queued(name, tmp_path, monkeypatch):
    error, status, label = ERRORS[name]
    response, sync_metrics = sync_answer(tmp_path / "sync", monkeypatch, error)
    queued, queue_metrics = queued_answer(tmp_path / "queue", monkeypatch, error)

    assert (response.status_code, queued.status_code) == (status, status)
    assert response.json() == json.loads(queued.result)
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

    monkeypatch.setattr(server.queue.dispatcher, "run_edit", failing(RuntimeError("disk on fire")))
    state = fake_state(tmp_path)
    store = RequestStore(tmp_path / "queue.sqlite3")
    store.add("r1", ENDPOINT, json.dumps(BODY), 0, "http://q", "http://f/", None, None)
    dispatcher = Dispatcher(store, state, webhooks=None)

    async def twice():
        for _ in range(server.queue.dispatcher.MAX_ATTEMPTS):
            request = store.claim([ENDPOINT])
            try:
                await dispatcher._run(request)
            except RuntimeError as exc:  # run_forever's handler: the worker failed on this request
                dispatcher.crashed(request, f"{type(exc).__name__}: {exc}")

    asyncio.run(twice())
    queued = store.get("r1")
    assert (queued.status, queued.status_code, queued.error_type) == ("COMPLETED", 500, "worker_crashed")
    assert jobs(state.metrics, "queue", "worker_crashed") == 1
    store.close()
