"""Webhooks: fal's payload POSTed on completion, retried with backoff; a failing receiver never blocks the queue."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.conftest import data_uri, image_bytes, start_server

BODY = {"prompt": "p", "image_urls": [data_uri(image_bytes(96, 96))], "image_size": "square", "seed": 3}


class Receiver:
    """A local webhook receiver that fails its first `failures` deliveries with HTTP 500."""

    def __init__(self, failures: int):
        self.failures = failures
        self.attempts: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                receiver.attempts.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(500 if len(receiver.attempts) <= receiver.failures else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}/hook"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.attempts) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.attempts


@pytest.fixture(scope="module")
def fast_retry_server(tiny_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("webhooks")
    process, url = start_server(
        tiny_weights,
        root / "data",
        root / "log",
        env={"FLUX2_WEBHOOK_BACKOFF_S": "0.1", "FLUX2_FETCH_ALLOW": "127.0.0.1/32"},
    )
    yield url
    process.terminate()
    process.wait(timeout=30)


def test_webhook_retried_until_delivered(fast_retry_server):
    receiver = Receiver(failures=2)
    handle = httpx.post(
        f"{fast_retry_server}/queue/fal-ai/flux-2/flash/edit", params={"fal_webhook": receiver.url}, json=BODY
    ).json()
    attempts = receiver.wait_for(3)
    assert len(attempts) == 3 and attempts[0] == attempts[2]
    payload = attempts[-1]
    assert payload["request_id"] == payload["gateway_request_id"] == handle["request_id"]
    assert payload["status"] == "OK" and payload["error"] is None
    assert payload["payload"] == httpx.get(handle["response_url"]).json()
    time.sleep(0.5)
    assert len(receiver.attempts) == 3  # no more once delivered


def test_error_webhook_and_a_dead_receiver_does_not_block(fast_retry_server):
    receiver = Receiver(failures=0)
    bad = {**BODY, "image_urls": ["data:image/png;base64,AAAA"]}
    httpx.post(f"{fast_retry_server}/queue/fal-ai/flux-2/flash/edit", params={"fal_webhook": receiver.url}, json=bad)
    [payload] = receiver.wait_for(1)
    assert payload["status"] == "ERROR" and payload["error"] == "Invalid status code: 422"  # fal's string
    assert payload["payload"]["detail"][0]["type"] == "image_load_error"

    dead = "http://127.0.0.1:9/unreachable"  # nothing listens: every attempt fails
    first = httpx.post(f"{fast_retry_server}/queue/fal-ai/flux-2/flash/edit", params={"fal_webhook": dead}, json=BODY)
    second = httpx.post(f"{fast_retry_server}/queue/fal-ai/flux-2/flash/edit", json=BODY).json()
    deadline = time.monotonic() + 60
    while httpx.get(second["status_url"]).json()["status"] != "COMPLETED":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert httpx.get(first.json()["status_url"]).json()["status"] == "COMPLETED"
