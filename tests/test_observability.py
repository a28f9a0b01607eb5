"""/metrics (Prometheus), /health vs /ready while the model loads or after it failed, JSON logs with request ids."""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

import server.service.model
from server.config import Settings
from server.http.app import create_app
from server.logs import JsonFormatter, logging_config
from tests.conftest import data_uri, free_port, image_bytes, start_server
from tests.test_queue import submit, wait_done

QUICK = {"prompt": "p", "image_urls": [data_uri(image_bytes(96, 96))], "image_size": "square", "seed": 3}


def scrape(client: httpx.Client, url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    response = client.get(url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_count_jobs_steps_and_latency(server):
    c = server.client
    before = scrape(c, server.url)
    handle = submit(c, server.url, "fal-ai/flux-2/flash/edit", QUICK)
    assert wait_done(c, handle)["error"] is None
    bad = server.post("fal-ai/flux-2/turbo/edit", {**QUICK, "image_urls": ["data:image/png;base64,AAAA"]})
    assert bad.status_code == 422
    assert server.post("fal-ai/flux-2/turbo/edit", QUICK).status_code == 200
    after = scrape(c, server.url)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    flash, turbo = "fal-ai/flux-2/flash/edit", "fal-ai/flux-2/turbo/edit"
    assert delta("flux2_jobs_total", endpoint=flash, mode="queue", outcome="ok") == 1
    assert delta("flux2_jobs_total", endpoint=turbo, mode="sync", outcome="ok") == 1
    failed = {
        dict(labels)["outcome"]: value - before.get((name, labels), 0.0)
        for (name, labels), value in after.items()
        if name == "flux2_jobs_total"
        and dict(labels)["mode"] == "sync"
        and dict(labels)["outcome"] != "ok"
        and value != before.get((name, labels), 0.0)  # outcomes of other tests on this server stay out
    }
    assert failed == {bad.json()["detail"][0]["type"]: 1}  # counted under the error's type
    assert delta("flux2_request_seconds_count", endpoint=flash, mode="queue") == 1
    assert delta("flux2_request_seconds_sum", endpoint=flash, mode="queue") > 0
    # flash runs 4 steps and turbo 8; the first step of each call is not observed (it includes prompt encoding)
    assert delta("flux2_step_seconds_count", profile="flash") == 3
    assert delta("flux2_step_seconds_count", profile="turbo") == 7
    assert after[("flux2_queue_depth", ())] == 0
    assert after[("flux2_model_loaded", ())] == 1
    assert after[("flux2_model_calls_waiting", ())] == 0
    assert not any(name.startswith("flux2_gpu_memory") for name, _ in after)  # the tiny model runs on the CPU


@pytest.fixture
def slow_loading(monkeypatch):
    """The model load blocks until the test releases it (or raises what the test puts in `fail`)."""
    release = threading.Event()
    fail: list[Exception] = []
    real_load = server.service.model.load_model

    def load(*args, **kwargs):
        release.wait(60)
        if fail:
            raise fail[0]
        return real_load(*args, **kwargs)

    monkeypatch.setattr(server.service.model, "load_model", load)
    return release, fail


@pytest.fixture
def in_process_app(tiny_weights, tmp_path):
    """Call it to start the app in this process with uvicorn (after patching what the test patches); it returns
    the URL once the server accepts connections."""
    servers = []

    def start() -> str:
        port = free_port()
        config = uvicorn.Config(
            create_app(Settings(data_dir=tmp_path / "data"), tiny_weights, tiny=True),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
        uv = uvicorn.Server(config)
        thread = threading.Thread(target=uv.run, daemon=True)
        thread.start()
        servers.append((uv, thread))
        deadline = time.monotonic() + 60
        while not uv.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}"

    start.weights = tiny_weights
    yield start
    for uv, thread in servers:
        uv.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def in_process(in_process_app):
    """The app started in this process; yields its URL once it accepts connections."""
    return in_process_app()


def test_ready_only_once_the_model_is_loaded_and_requests_meanwhile_wait(slow_loading, in_process):
    release, _ = slow_loading
    with httpx.Client(timeout=120) as c:
        health = c.get(in_process + "/health")
        assert health.status_code == 200 and health.json()["model"] == "loading"
        assert c.get(in_process + "/ready").status_code == 503
        handle = submit(c, in_process, "fal-ai/flux-2/flash/edit", QUICK)  # accepted while loading
        answers = []
        sync = threading.Thread(
            target=lambda: answers.append(c.post(in_process + "/fal-ai/flux-2/flash/edit", json=QUICK))
        )
        sync.start()
        time.sleep(0.5)
        assert not answers and c.get(handle["status_url"]).json()["status"] == "IN_QUEUE"
        release.set()
        sync.join(120)
        assert answers[0].status_code == 200, answers[0].text
        assert wait_done(c, handle)["error"] is None
        ready = c.get(in_process + "/ready")
        assert ready.status_code == 200 and ready.json() == {"ready": True, "model": "loaded", "error": None}


def test_health_shows_the_load_progress(monkeypatch, in_process_app, caplog):
    """While the real loader reads the transformer (held there by the test), /health says so, with bytes."""
    reading_transformer, release = threading.Event(), threading.Event()
    real_load = server.service.model.load_model

    def load(settings, weights_dir, on_progress):
        def watched(progress):
            on_progress(progress)
            if progress.component == "transformer":
                reading_transformer.set()
                release.wait(60)

        return real_load(settings, weights_dir, watched)

    monkeypatch.setattr(server.service.model, "load_model", load)
    caplog.set_level(logging.INFO, logger="pipelines.editor")
    url = in_process_app()
    with httpx.Client(timeout=60) as c:
        assert reading_transformer.wait(60)
        loading = c.get(url + "/health").json()["loading"]
        assert loading["stage"] == "read" and loading["component"] == "transformer"
        assert 0 < loading["bytes_read"] < loading["bytes_total"]  # the text encoder and the VAE are read
        transformer = sum(p.stat().st_size for p in (in_process_app.weights / "transformer").glob("*.safetensors"))
        assert loading["bytes_total"] - loading["bytes_read"] >= transformer
        release.set()
        deadline = time.monotonic() + 60
        while (health := c.get(url + "/health").json())["model"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health["model"] == "loaded" and health["loading"] is None
    stages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loading ")]
    for stage in ("read text_encoder", "read transformer", "adapters", "place", "done"):
        assert any(f": {stage} (" in message for message in stages), stages


def test_a_model_that_fails_to_load_fails_health_and_ready_and_keeps_queued_work(slow_loading, in_process):
    release, fail = slow_loading
    fail.append(RuntimeError("CUDA error: no kernel image (injected by the test)"))
    with httpx.Client(timeout=60) as c:
        handle = submit(c, in_process, "fal-ai/flux-2/flash/edit", QUICK)
        release.set()
        deadline = time.monotonic() + 30
        while c.get(in_process + "/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = c.get(in_process + "/health")
        assert health.status_code == 503 and "no kernel image" in health.json()["error"]
        ready = c.get(in_process + "/ready")
        assert ready.status_code == 503 and ready.json()["model"] == "failed"
        sync = c.post(in_process + "/fal-ai/flux-2/flash/edit", json=QUICK)
        assert sync.status_code == 503 and "failed to load" in sync.json()["detail"]
        assert c.get(handle["status_url"]).json()["status"] == "IN_QUEUE"  # kept for the next start


def test_json_logs_carry_the_fal_request_id(tiny_weights, tmp_path):
    process, url = start_server(tiny_weights, tmp_path / "data", tmp_path / "log", "--log-format", "json")
    try:
        with httpx.Client(timeout=120) as c:
            answer = c.post(url + "/fal-ai/flux-2/flash/edit", json=QUICK, headers={"X-Request-Id": "trace-42"})
            assert answer.status_code == 200
            request_id = answer.headers["x-fal-request-id"]
            c.get(url + "/health", headers={"X-Request-Id": "trace-43"})
    finally:
        process.terminate()
        process.wait(timeout=30)
    lines = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    steps = [line for line in lines if line["message"].endswith("step 4/4")]
    assert steps and steps[0]["request_id"] == request_id  # from the inference thread, with the fal request id
    health = [line for line in lines if line.get("path") == "/health" and line.get("request_id") == "trace-43"]
    assert health and health[0]["status"] == 200 and health[0]["method"] == "GET"


def test_text_and_json_formats_and_nothing_else():
    assert logging_config("text")["formatters"]["default"]["format"].startswith("%(asctime)s")
    assert logging_config("json")["formatters"]["default"]["()"] is JsonFormatter
    with pytest.raises(ValueError, match="log format"):
        logging_config("yaml")


def test_every_response_says_how_long_the_server_took_in_server_timing(fake_server):
    """W3C Server Timing: `app;dur=<ms>` from the request's arrival to its response, errors included; a sync edit's
    covers its model call (the fake editor sleeps 4 x 50 ms: a lower bound, not a speed goal)."""
    import re

    from tests.fake_editor import FakeEditor

    client, _ = fake_server(FakeEditor(step_s=0.05))
    body = {"prompt": "p", "image_urls": [data_uri(image_bytes(64, 64))], "image_size": "square"}
    edited = client.post("/fal-ai/flux-2/flash/edit", json=body)
    refused = client.post("/fal-ai/flux-2/flash/edit", json={"prompt": "p"})
    health = client.get("/health")
    for answer, status in ((edited, 200), (refused, 422), (health, 200)):
        assert answer.status_code == status
        assert re.fullmatch(r"app;dur=\d+\.\d", answer.headers["server-timing"]), answer.headers["server-timing"]
    assert float(edited.headers["server-timing"].split("=")[1]) >= 4 * 50
