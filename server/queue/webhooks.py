"""fal's webhooks: when a queued request with `?fal_webhook=URL` completes, POST its outcome to URL, signed.

The payload is fal's: request_id, gateway_request_id, status OK/ERROR, payload, error. Each delivery is signed as
fal signs its own (server/queue/webhook_signing.py). A failed delivery is retried as fal retries: 10 attempts, the
wait doubling from `backoff_s` (14 s by default: about 2 hours in all).

A delivery not yet made is kept in the queue backend (`save_webhook`), leased to the process that makes it until
its next attempt is due plus `timeout_s + resume_every_s`. When that process stops (SIGTERM, a crash, SIGKILL), its
lease runs out and any process on the same queue picks the delivery up (`take_webhooks`, checked every
`resume_every_s`), attempts already made counted: a restart loses no webhook, and a worker's pending deliveries are
made by another process (tests/test_scale_out_faults.py kills a worker during a delivery's backoff).

Deliveries go through the same SSRF guard as input images (server/net/guard.py); a webhook URL the guard refuses is
refused at submit (server/http/routes/queue.py), and one that resolves differently later is dropped, not retried.
Delivery runs in background tasks, so a slow or failing receiver never holds up the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import httpx

from server.errors import QueueUnavailable
from server.net.guard import AddressRefused
from server.queue.backend import QueueBackend
from server.queue.webhook_signing import WebhookSigner

log = logging.getLogger(__name__)

ATTEMPTS = 10
TIMEOUT_S = 10.0
RESUME_EVERY_S = 30.0


def webhook_payload(request_id: str, status_code: int, result: dict) -> dict:
    ok = status_code < 400
    return {
        "request_id": request_id,
        "gateway_request_id": request_id,
        "status": "OK" if ok else "ERROR",
        "payload": result,
        "error": None if ok else f"Invalid status code: {status_code}",  # fal's string; the details are in payload
    }


class WebhookSender:
    def __init__(
        self,
        client: httpx.AsyncClient,
        store: QueueBackend,
        signer: WebhookSigner,
        backoff_s: float = 14.0,
        attempts: int = ATTEMPTS,
        resume_every_s: float = RESUME_EVERY_S,
        timeout_s: float = TIMEOUT_S,
    ):
        self.client = client
        self.store = store
        self.signer = signer
        self.backoff_s = backoff_s
        self.attempts = attempts
        self.resume_every_s = resume_every_s
        self.timeout_s = timeout_s
        # a delivery's lease lasts until its next attempt is due and this much longer: an attempt, and one look
        self.lease_margin_s = timeout_s + resume_every_s
        self._tasks: set[asyncio.Task] = set()
        self._resumer: asyncio.Task | None = None

    def start(self) -> None:
        """Pick up deliveries left by processes that stopped (at once, then every `resume_every_s`)."""
        self._resumer = asyncio.create_task(self._resume_forever(), name="webhook resumer")

    def send(self, url: str, payload: dict) -> None:
        """Keep the delivery in the queue, then make it."""
        delivery = self.delivery(url, payload)
        try:
            self._keep(delivery)
        except QueueUnavailable:  # the outcome is recorded: deliver it now, kept in this process only
            log.warning("webhook for %s: the queue is unreachable; delivering it unrecorded", payload["request_id"])
        self.deliver(delivery)

    @staticmethod
    def delivery(url: str, payload: dict) -> dict:
        """A new delivery of `payload` to `url`, as the queue keeps it until it is made."""
        return {
            "request_id": payload["request_id"],
            "url": url,
            "body": json.dumps(payload),
            "attempts_made": 0,
            "next_at": time.time(),
        }

    def lease_s(self, delivery: dict) -> float:
        """How long this process holds `delivery`: until its next attempt is due, and `lease_margin_s`."""
        return max(0.0, delivery["next_at"] - time.time()) + self.lease_margin_s

    def deliver(self, delivery: dict) -> None:
        """Make a delivery already kept in the queue (by `complete` with the outcome it reports, or `send`)."""
        self._spawn(delivery)

    def _keep(self, delivery: dict) -> None:
        self.store.save_webhook(delivery["request_id"], delivery, self.lease_s(delivery))

    def _spawn(self, delivery: dict) -> None:
        task = asyncio.create_task(self._deliver(delivery), name=f"webhook {delivery['request_id']}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resume_forever(self) -> None:
        while True:
            try:
                for delivery in self.store.take_webhooks(self.lease_margin_s):
                    log.info("resuming the webhook for %s", delivery["request_id"])
                    self._spawn(delivery)
            except QueueUnavailable:  # Redis down or restarting (the queue logs it): try again later
                pass
            except Exception:
                log.exception("could not read pending webhooks")
            await asyncio.sleep(self.resume_every_s)

    async def _deliver(self, delivery: dict) -> None:
        request_id, url = delivery["request_id"], delivery["url"]
        body = delivery["body"].encode()
        while delivery["attempts_made"] < self.attempts:
            await asyncio.sleep(max(0.0, delivery["next_at"] - time.time()))
            attempt = delivery["attempts_made"] + 1
            headers = {"Content-Type": "application/json", **self.signer.headers(request_id, body)}
            try:
                response = await self.client.post(url, content=body, headers=headers, timeout=self.timeout_s)
                if response.status_code < 300:
                    log.info("webhook for %s delivered (attempt %d)", request_id, attempt)
                    self.store.webhook_done(request_id)
                    return
                problem = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            except AddressRefused as exc:  # the SSRF guard: retrying can't help
                log.error("webhook for %s to %s refused: %s", request_id, url, exc)
                self.store.webhook_done(request_id)
                return
            log.warning(
                "webhook for %s to %s failed (attempt %d/%d): %s", request_id, url, attempt, self.attempts, problem
            )
            delivery = {
                **delivery,
                "attempts_made": attempt,
                "next_at": time.time() + self.backoff_s * 2 ** (attempt - 1),
            }
            if attempt < self.attempts:
                self._keep(delivery)
        log.error("webhook for %s to %s abandoned after %d attempts", request_id, url, self.attempts)
        self.store.webhook_done(request_id)

    async def close(self) -> None:
        """Stop; deliveries not made stay in the queue for the next process (their leases run out)."""
        tasks = [*self._tasks, *([self._resumer] if self._resumer else [])]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
