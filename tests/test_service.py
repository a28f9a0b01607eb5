"""Health and honest notices; faults answered with 5xx while the server keeps serving; the loop never blocks."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn

from pipelines.editor import Flux2Editor
from server.config import Settings
from server.http.app import create_app
from tests.conftest import data_uri, free_port, image_bytes

GOOD = {"prompt": "p", "image_urls": [data_uri(image_bytes(96, 96))], "image_size": "square", "seed": 1}


def test_health_states_what_is_not_available(server):
    health = server.client.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["tiny_model"] is True
    caps = health["capabilities"]
    assert caps["device"] == "cpu" and caps["dtype"] == "float32"
    assert caps["safety_checker"] is True and caps["prompt_expansion"] is True  # the tiny build has both
    assert caps["acceleration"]["available"] == ["none", "regular", "high"]
    assert caps["memory"]["mode"] == "full" and caps["memory"]["device"] == "cpu"
    assert caps["profiles"]["turbo"]["steps"] == 8 and caps["profiles"]["flash"]["steps"] == 4
    assert caps["profiles"]["turbo"]["distilled_adapter_loaded"] is True  # the tiny build has a turbo LoRA
    assert health["allow_undistilled"] is False


def test_notices_say_what_was_not_done(server):
    asked = server.post(
        "fal-ai/flux-2/edit",
        {**GOOD, "enable_prompt_expansion": True, "acceleration": "high", "num_inference_steps": 4},
    ).json()
    notices = " ".join(asked["notices"])
    assert "safety checker" not in notices  # it ran (tests/test_safety.py: when it can't or is turned off)
    assert "expansion" not in notices.lower()  # it ran
    assert "Acceleration 'high' skips no step of a 4-step run" in notices  # too few steps to cache any
    assert asked["has_nsfw_concepts"] == [False]  # the tiny checker's verdict at the default threshold
    assert asked["prompt"] not in ("", "p")  # the prompt actually used: the expanded one

    plain = server.post(
        "fal-ai/flux-2/edit",
        {**GOOD, "enable_safety_checker": False, "acceleration": "none", "num_inference_steps": 4},
    ).json()
    assert plain["notices"] == []

    turbo = server.post("fal-ai/flux-2/turbo/edit", {**GOOD, "enable_safety_checker": False}).json()
    assert turbo["notices"] == []  # its distilled adapter ran (tests/test_adapters.py: undistilled notices)


def test_event_loop_stays_free_while_the_model_works(server):
    """While a long edit runs, /health answers and sees it waiting."""
    long_job = threading.Thread(
        target=server.post,
        args=("fal-ai/flux-2/edit", {**GOOD, "num_inference_steps": 50, "image_size": "square_hd"}),
    )
    long_job.start()
    seen_busy = False
    while long_job.is_alive():
        health = httpx.get(f"{server.url}/health", timeout=10).json()
        seen_busy |= health["waiting"] >= 1
        time.sleep(0.05)
    long_job.join()
    assert seen_busy


def test_openapi_documents_the_three_endpoints(server):
    spec = server.client.get(f"{server.url}/openapi.json").json()
    for path in ("/fal-ai/flux-2/edit", "/fal-ai/flux-2/turbo/edit", "/fal-ai/flux-2/flash/edit"):
        assert "post" in spec["paths"][path]
    schemas = spec["components"]["schemas"]
    assert schemas["Flux2EditInput"]["properties"]["num_inference_steps"]["maximum"] == 50
    assert "num_inference_steps" not in schemas["Flux2FastEditInput"]["properties"]
    assert schemas["Flux2EditInput"]["required"] == ["prompt", "image_urls"]


@pytest.fixture
def in_process_server(tiny_weights, tmp_path):
    """The same app, run by uvicorn on loopback in this process, so a test can inject a fault into the model."""
    settings = Settings(data_dir=tmp_path / "data")
    port = free_port()
    config = uvicorn.Config(
        create_app(settings, tiny_weights, tiny=True), host="127.0.0.1", port=port, log_level="warning"
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(timeout=30)


def test_a_fault_in_the_model_is_a_500_and_the_next_request_succeeds(in_process_server, monkeypatch):
    real_edit = Flux2Editor.edit
    faults = iter([RuntimeError("CUDA out of memory (injected by the test)")])

    def faulty_edit(self, call):
        fault = next(faults, None)
        if fault:
            raise fault
        return real_edit(self, call)

    monkeypatch.setattr(Flux2Editor, "edit", faulty_edit)
    with httpx.Client(timeout=120) as client:
        failed = client.post(f"{in_process_server}/fal-ai/flux-2/flash/edit", json=GOOD)
        assert failed.status_code == 500
        assert "CUDA out of memory (injected by the test)" in failed.json()["detail"]
        ok = client.post(f"{in_process_server}/fal-ai/flux-2/flash/edit", json=GOOD)
        assert ok.status_code == 200
        assert client.get(f"{in_process_server}/health").json()["waiting"] == 0
