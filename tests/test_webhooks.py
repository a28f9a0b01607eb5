"""Webhooks: fal's payload POSTed on completion, signed as fal signs, retried with backoff, kept across restarts; a
failing receiver never blocks the queue."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from server.config import Settings
from server.queue import webhooks
from server.queue.connect import open_queue
from server.queue.webhook_signing import WebhookSigner
from tests.conftest import data_uri, image_bytes, start_server

BODY = {"prompt": "p", "image_urls": [data_uri(image_bytes(96, 96))], "image_size": "square", "seed": 3}


class Receiver:
    """A local webhook receiver that fails its first `failures` deliveries with HTTP 500."""

    def __init__(self, failures: int):
        self.failures = failures
        self.attempts: list[dict] = []
        self.raw: list[tuple[dict[str, str], bytes]] = []  # each attempt's headers and body, as sent
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.raw.append(({k.lower(): v for k, v in self.headers.items()}, body))
                receiver.attempts.append(json.loads(body))
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


def verify_fal_webhook(headers: dict[str, str], body: bytes, jwks: dict, now: float | None = None) -> bool:
    """A receiver's check, written from fal's webhook documentation ("Verifying webhook signatures"): the four
    X-Fal-Webhook-* headers; the timestamp within 5 minutes; the message is request id, user id, timestamp and the
    SHA-256 hex digest of the raw body, joined by newlines; the signature (hex) must verify with one of the JWKS's
    Ed25519 keys (`x`, base64url)."""
    names = ("request-id", "user-id", "timestamp", "signature")
    values = [headers.get(f"x-fal-webhook-{name}") for name in names]
    if not all(values):
        return False
    request_id, user_id, timestamp, signature = values
    if abs((time.time() if now is None else now) - int(timestamp)) > 300:
        return False
    message = "\n".join([request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]).encode()
    for key in jwks["keys"]:
        public_key = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(key["x"] + "=" * (-len(key["x"]) % 4)))
        try:
            public_key.verify(bytes.fromhex(signature), message)
            return True
        except InvalidSignature:
            continue
    return False


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

    # signed as fal signs: a receiver using fal's verification, pointed at this server's JWKS, accepts each attempt
    jwks = httpx.get(f"{fast_retry_server}/.well-known/jwks.json").json()  # open, like /health
    assert jwks["keys"][0]["kty"] == "OKP" and jwks["keys"][0]["crv"] == "Ed25519"
    for headers, body in receiver.raw:
        assert headers["x-fal-webhook-request-id"] == handle["request_id"]
        assert verify_fal_webhook(headers, body, jwks)
    headers, body = receiver.raw[-1]
    assert not verify_fal_webhook(headers, body.replace(b'"OK"', b'"ERROR"'), jwks)  # a changed body fails
    assert not verify_fal_webhook(headers, body, jwks, now=time.time() + 600)  # ... and so does a stale one


def test_a_webhook_url_the_guard_refuses_is_a_422_at_submit(server):
    url = server.url  # the shared server: no FLUX2_FETCH_ALLOW
    refused = httpx.post(
        f"{url}/queue/fal-ai/flux-2/flash/edit", params={"fal_webhook": "http://127.0.0.1:9/hook"}, json=BODY
    )
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"][0]["loc"] == ["query", "fal_webhook"]
    assert "loopback" in refused.json()["detail"][0]["msg"]


def test_a_pending_delivery_is_made_by_the_next_process(tmp_path):
    """A delivery that failed is kept in the queue; when its process stops, the next one to start makes it."""
    receiver = Receiver(failures=1)
    signer = WebhookSigner.load_or_create(tmp_path, "user-1")
    payload = webhooks.webhook_payload("req-1", 200, {"images": []})

    async def first_then_second_process():
        store = open_queue(None, tmp_path, retention_s=60)
        async with httpx.AsyncClient() as client:
            first = webhooks.WebhookSender(client, store, signer, backoff_s=0.5, resume_every_s=0.05, timeout_s=0.5)
            first.send(receiver.url, payload)
            while not receiver.attempts:
                await asyncio.sleep(0.01)
            await first.close()  # stopped before its second attempt
        store.close()
        assert len(receiver.attempts) == 1
        store = open_queue(None, tmp_path, retention_s=60)  # the queue as the next process opens it
        async with httpx.AsyncClient() as client:
            second = webhooks.WebhookSender(client, store, signer, backoff_s=0.5, resume_every_s=0.05, timeout_s=0.5)
            second.start()
            while len(receiver.attempts) < 2:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            await second.close()
        assert store.take_webhooks(lease_s=0) == []  # delivered: nothing left pending
        store.close()

    asyncio.run(asyncio.wait_for(first_then_second_process(), 30))
    assert receiver.attempts == [payload, payload]
    jwks = signer.jwks()
    assert all(verify_fal_webhook(headers, body, jwks) for headers, body in receiver.raw)


def test_ten_attempts_over_about_two_hours_by_default():
    backoff, attempts = (Settings.model_fields[name].default for name in ("webhook_backoff_s", "webhook_attempts"))
    delays = [backoff * 2**attempt for attempt in range(attempts - 1)]  # the waits between attempts, as fal's
    assert attempts == 10 and 1.8 * 3600 < sum(delays) < 2.2 * 3600


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


def test_a_webhook_url_that_does_not_parse_is_a_422_at_submit(fake_server):
    """Found by the fuzzer: urlsplit refuses "https://x[" (an unclosed IPv6 bracket); a 422 naming the parameter,
    not a 500."""
    from tests.fake_editor import FakeEditor

    client, _ = fake_server(FakeEditor())
    for hook in ("https://x[", "https://9BB\u00f5[", "http://host:99999/"):
        refused = client.post("/queue/fal-ai/flux-2/flash", params={"fal_webhook": hook}, json={"prompt": "p"})
        assert refused.status_code == 422, (hook, refused.text)
        assert refused.json()["detail"][0]["loc"] == ["query", "fal_webhook"]
