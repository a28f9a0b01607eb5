"""Runs queued requests one at a time, in order of priority then arrival, and records their outcome."""

from __future__ import annotations

import asyncio
import logging
import time

from pipelines import Cancelled
from server.editing import run_edit
from server.endpoints import BY_ID
from server.errors import InferenceError, InputError
from server.queue_store import QueuedRequest, RequestStore
from server.webhooks import WebhookSender, webhook_payload

log = logging.getLogger(__name__)

CANCELLED = "Request was cancelled"


class Dispatcher:
    def __init__(self, store: RequestStore, state, webhooks: WebhookSender):
        self.store = store
        self.state = state
        self.webhooks = webhooks
        self.cancel_requested: set[str] = set()  # running requests to stop at their next step
        self._wakeup = asyncio.Event()
        self.stopping = False

    def stop(self) -> None:
        """Take no more work and stop the running request at its next step; it stays IN_PROGRESS in the store,
        so the next start re-queues it."""
        self.stopping = True
        self._wakeup.set()

    def finish(
        self,
        request: QueuedRequest,
        status_code: int,
        result: dict,
        error: str | None = None,
        error_type: str | None = None,
        metrics: dict | None = None,
        only_if_queued: bool = False,
    ) -> bool:
        """Record a request's outcome and send its webhook; False if it had already finished (or started, with
        `only_if_queued`)."""
        if not self.store.complete(request.id, status_code, result, error, error_type, metrics, only_if_queued):
            return False
        if request.webhook_url:
            self.webhooks.send(request.webhook_url, webhook_payload(request.id, status_code, result, error))
        return True

    def cancel(self, request: QueuedRequest) -> bool:
        """Cancel a queued request at once, or ask a running one to stop at its next step; False if finished."""
        if self.finish(request, 400, {"detail": CANCELLED}, CANCELLED, "request_cancelled", only_if_queued=True):
            self.store.log(request.id, CANCELLED, "WARNING")
            return True
        if self.store.get(request.id).status == "IN_PROGRESS":
            self.cancel_requested.add(request.id)
            return True
        return False

    def notify(self) -> None:
        """Something was queued."""
        self._wakeup.set()

    async def run_forever(self) -> None:
        while not self.stopping:
            request = self.store.next_queued()
            if request is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                await self._run(request)
            except Exception:  # a fault in the bookkeeping itself: record it, keep serving the queue
                log.exception("request %s failed outside the model", request.id)
                self.finish(
                    request, 500, {"detail": "Internal server error"}, "Internal server error", "internal_error"
                )

    async def _run(self, request: QueuedRequest) -> None:
        if request.start_deadline and time.time() > request.start_deadline:
            message = "Request timed out before processing started (X-Fal-Request-Timeout)"
            self.finish(request, 504, {"detail": message}, message, "request_timeout", only_if_queued=True)
            return
        if not self.store.mark_started(request.id):
            return  # cancelled between the queue read and now
        endpoint = BY_ID[request.endpoint_id]
        body = endpoint.input_model.model_validate_json(request.input)
        started = time.perf_counter()
        try:
            output = await run_edit(
                self.state,
                endpoint.profile,
                body,
                request.files_url,
                request.id,
                on_log=lambda message: self.store.log(request.id, message),
                should_cancel=lambda: self.stopping or request.id in self.cancel_requested,
            )
        except InputError as exc:
            self.finish(request, exc.status, {"detail": [exc.detail]}, exc.detail["msg"], exc.detail["type"])
        except Cancelled:
            if self.stopping:
                log.info("request %s interrupted by shutdown: it runs again at the next start", request.id)
                return
            self.store.log(request.id, CANCELLED, "WARNING")
            self.finish(request, 400, {"detail": CANCELLED}, CANCELLED, "request_cancelled")
        except InferenceError as exc:
            self.finish(request, 500, {"detail": f"Inference failed: {exc}"}, str(exc), "inference_error")
        else:
            metrics = {"inference_time": time.perf_counter() - started}
            self.finish(request, 200, output.model_dump(mode="json"), metrics=metrics)
        finally:
            self.cancel_requested.discard(request.id)
