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

log = logging.getLogger(__name__)

CANCELLED = "Request was cancelled"


class Dispatcher:
    def __init__(self, store: RequestStore, state):
        self.store = store
        self.state = state
        self.cancel_requested: set[str] = set()  # running requests to stop at their next step
        self._wakeup = asyncio.Event()
        self.stopping = False

    def stop(self) -> None:
        """Take no more work and stop the running request at its next step; it stays IN_PROGRESS in the store,
        so the next start re-queues it."""
        self.stopping = True
        self._wakeup.set()

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
                self.store.complete(request.id, 500, {"detail": "Internal server error"}, "Internal server error",
                                    "internal_error")  # fmt: skip

    async def _run(self, request: QueuedRequest) -> None:
        if request.start_deadline and time.time() > request.start_deadline:
            message = "Request timed out before processing started (X-Fal-Request-Timeout)"
            self.store.complete(request.id, 504, {"detail": message}, message, "request_timeout", only_if_queued=True)
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
            self.store.complete(request.id, exc.status, {"detail": [exc.detail]}, exc.detail["msg"], exc.detail["type"])
        except Cancelled:
            if self.stopping:
                log.info("request %s interrupted by shutdown: it runs again at the next start", request.id)
                return
            self.store.log(request.id, CANCELLED, "WARNING")
            self.store.complete(request.id, 400, {"detail": CANCELLED}, CANCELLED, "request_cancelled")
        except InferenceError as exc:
            self.store.complete(request.id, 500, {"detail": f"Inference failed: {exc}"}, str(exc), "inference_error")
        else:
            metrics = {"inference_time": time.perf_counter() - started}
            self.store.complete(request.id, 200, output.model_dump(mode="json"), metrics=metrics)
        finally:
            self.cancel_requested.discard(request.id)
