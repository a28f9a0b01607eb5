"""fal's webhooks: when a queued request with `?fal_webhook=URL` completes, POST its outcome to URL.

Delivery runs in background tasks with exponential backoff, so a slow or failing receiver never holds up the
queue. Deliveries go through the same SSRF guard as input images (server/net/guard.py): a webhook URL that resolves
to a loopback/private/link-local/... address is not called unless FLUX2_FETCH_ALLOW allows it. The payload is
fal's: request_id, gateway_request_id, status OK/ERROR, payload, error.
"""

from __future__ import annotations

import asyncio
import logging

import httpx

from server.net.guard import AddressRefused

log = logging.getLogger(__name__)

ATTEMPTS = 6
TIMEOUT_S = 10.0


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
    def __init__(self, client: httpx.AsyncClient, backoff_s: float = 1.0):
        self.client = client
        self.backoff_s = backoff_s
        self._tasks: set[asyncio.Task] = set()

    def send(self, url: str, payload: dict) -> None:
        task = asyncio.create_task(self._deliver(url, payload), name=f"webhook {payload['request_id']}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, url: str, payload: dict) -> None:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                response = await self.client.post(url, json=payload, timeout=TIMEOUT_S)
                if response.status_code < 300:
                    log.info("webhook for %s delivered (attempt %d)", payload["request_id"], attempt)
                    return
                problem = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            except AddressRefused as exc:  # the SSRF guard: retrying can't help
                log.error("webhook for %s to %s refused: %s", payload["request_id"], url, exc)
                return
            log.warning(
                "webhook for %s to %s failed (attempt %d/%d): %s",
                payload["request_id"],
                url,
                attempt,
                ATTEMPTS,
                problem,
            )
            if attempt < ATTEMPTS:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
        log.error("webhook for %s to %s abandoned after %d attempts", payload["request_id"], url, ATTEMPTS)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
