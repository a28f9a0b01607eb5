"""Runs queued requests one at a time, in order of priority then arrival, and records their outcome. It is the only
caller of the model (through `EditService`): a sync request is queued like any other and its caller awaits it
(`submit_and_wait`: an in-process future, resolved here), so queue positions and the queue depth count every call
waiting for the model.

The same logic serves both deployments: inside `flux2-server serve` over the embedded SQLite queue, and inside
each `flux2-server worker` over Redis. It talks to the queue only through `server.queue.backend.QueueBackend`.

A fault outside the model (anything but bad input, a cancel or an `InferenceError`) is treated as the worker
failing on the request: it is logged, the dispatcher goes on, and the request is re-queued once. The queue counts
every start (`attempts`), so a request that brings the whole process down (a segfault, the OOM killer) is failed
when it is claimed a third time, instead of taking down every restart (or every worker) in turn.

A queue that can't be reached (`QueueUnavailable`: Redis down or restarting) is waited out, for as long as it
takes: the running request goes on (a cancel can't be heard meanwhile), its outcome is held here and recorded when
the queue is back, and the loop tries again, its waits doubling up to `retry_max_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable

from pydantic import ValidationError

from pipelines import Cancelled
from server.endpoints import BY_ID, ENDPOINTS
from server.errors import (
    CANCELLED,
    InferenceError,
    InvalidBody,
    QueueUnavailable,
    RequestCancelled,
    ServerError,
    StartDeadlinePassed,
    Unavailable,
    WorkerCrashed,
    answer_for,
)
from server.logs import request_id_var
from server.queue.backend import SYNC, QueueBackend, QueuedRequest
from server.queue.webhooks import WebhookSender, webhook_payload
from server.schemas import EditOutput
from server.service.edit import EditService
from server.service.model import ModelState

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # the first run and one re-run after a worker failure
IDLE_RECHECK_S = 1.0  # an idle dispatcher looks at the queue at least this often (e.g. for abandoned requests)
RECORD_ATTEMPTS = 3  # tries to record a request's fault in the queue (a full disk, a locked database) ...
RECORD_RETRY_S = 0.5  # ... this long apart, doubling; then the request is given up and the dispatcher goes on
OUTAGE_RETRY_S = 0.5  # the queue unreachable: the first wait before trying again (doubling up to retry_max_s)


class Dispatcher:
    def __init__(
        self,
        store: QueueBackend,
        service: EditService,
        webhooks: WebhookSender | None,
        profiles: list[str] | None = None,
        retry_max_s: float = 30.0,
    ):
        self.store = store
        self.retry_max_s = retry_max_s  # the longest wait between tries while the queue is unreachable
        self.service = service
        self.webhooks = webhooks
        # the endpoints this dispatcher takes requests for: those whose profile its model runs (default: all)
        self.endpoint_ids = [e.endpoint_id for e in ENDPOINTS if profiles is None or e.profile in profiles]
        self._wakeup = asyncio.Event()
        self.stopping = False
        self._stopped = asyncio.Event()  # set with `stopping`: cuts short a wait for the queue to come back
        # sync requests queued by this process, by id: their callers await these (never through the queue row)
        self._waiters: dict[str, asyncio.Future[EditOutput]] = {}
        self.running = False  # in its loop (after the model loaded)
        self.died: str | None = None  # why the loop ended other than by `stop` (/health and /ready say so)

    async def submit_and_wait(self, request_id: str, add: Callable[[], None]) -> EditOutput:
        """A sync request: `add` queues it (as `request_id`); its caller waits here for its output, or the error it
        ended in (raised). The output goes to the caller, not into the queue row."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = waiter
        try:
            add()
            self.notify()
            return await waiter
        finally:
            self._waiters.pop(request_id, None)

    def stop(self) -> None:
        """Take no more work and stop the running request at its next step; the queue gets it back
        (`QueueBackend.release`) to run again."""
        self.stopping = True
        self._stopped.set()
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
        outcome = "ok" if status_code == 200 else error_type or "internal_error"  # error_type: from answer_for
        mode = "sync" if request.id in self._waiters else "queue"
        self.service.metrics.job_finished(request.endpoint_id, mode, outcome, time.time() - request.created_at)
        if request.webhook_url and self.webhooks is not None:
            self.webhooks.send(request.webhook_url, webhook_payload(request.id, status_code, result))
        return True

    def fail(self, request: QueuedRequest, error: BaseException, only_if_queued: bool = False) -> bool:
        """Record that a request ended in `error`, answered and counted as `server.errors.answer_for` says."""
        answer = answer_for(error)
        if not self.finish(
            request, answer.status, answer.body, answer.message, answer.error_type, only_if_queued=only_if_queued
        ):
            return False
        waiter = self._waiters.get(request.id)
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        return True

    def succeed(self, request: QueuedRequest, output: EditOutput, metrics: dict) -> None:
        waiter = self._waiters.get(request.id)
        result = output.model_dump(mode="json")
        if waiter is not None:  # the caller gets the output itself; the row keeps it without inline images
            result["images"] = [{**image, "url": elided(image["url"])} for image in result["images"]]
        if self.finish(request, 200, result, metrics=metrics) and waiter is not None and not waiter.done():
            waiter.set_result(output)

    def cancel(self, request: QueuedRequest) -> bool:
        """Cancel a queued request at once, or ask a running one to stop at its next step; False if finished, or
        too far to stop: every denoising step done (decoding, encoding, storing), it completes as it is."""
        if self.fail(request, RequestCancelled(), only_if_queued=True):
            self.store.log(request.id, CANCELLED, "WARNING")
            return True
        current = self.store.get(request.id)
        if current is None or current.status != "IN_PROGRESS":
            return False
        if current.progress_total and (current.progress_step or 0) >= current.progress_total:
            return False
        self.store.request_cancel(request.id)
        return True

    def notify(self) -> None:
        """Something was queued."""
        self._wakeup.set()

    async def run_forever(self) -> None:
        await self.service.model.settled()  # queued requests wait (in the store) while the model loads
        if self.service.model.state is not ModelState.LOADED:
            return  # it failed to load: nothing runs here, /health and /ready say why
        self.running = True
        try:
            # one loop per replica (`serve --gpus`): each claims the next request when its model is free
            replicas = getattr(self.service.model.runner, "replicas", 1)
            await asyncio.gather(*(self._loop() for _ in range(replicas)))
        except BaseException as exc:
            if not self.stopping:
                self.died = f"{type(exc).__name__}: {exc}"
                log.critical("the dispatcher stopped: %s; no request runs until the server is restarted", self.died)
            raise
        finally:
            self.running = False

    async def _loop(self) -> None:
        delay = OUTAGE_RETRY_S
        while not self.stopping:
            self._wakeup.clear()
            try:
                request = self.store.claim(self.endpoint_ids)
                delay = OUTAGE_RETRY_S
                if request is None:
                    await self.store.wait_for_work(self._wakeup, IDLE_RECHECK_S)
                    continue
            except QueueUnavailable:  # Redis down or restarting (logged by the queue): try again, less and less often
                await self._pause(delay)
                delay = min(delay * 2, self.retry_max_s)
                continue
            except Exception:
                log.exception("could not read the queue; trying again in %.0f s", IDLE_RECHECK_S)
                await asyncio.sleep(IDLE_RECHECK_S)
                continue
            try:
                await self._run(request)
            except Exception as exc:  # a fault outside the model (or writing to the queue): the worker failed here
                log.exception("request %s failed outside the model", request.id)
                await self._record_fault(request, exc)

    async def _pause(self, seconds: float) -> None:
        """Sleep, or less if the dispatcher is told to stop meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), seconds)

    async def _settle(self, request: QueuedRequest, record: Callable[[], object]) -> None:
        """Record an outcome of `request` (`record`: `succeed`, `fail`, `release`...), waiting out a queue that can't
        be reached, however long, with the outcome held here. A stop meanwhile gives up (the request runs again once
        its claim expires: work is at-least-once, its recorded result exactly once)."""
        delay = OUTAGE_RETRY_S
        while True:
            try:
                record()
                return
            except QueueUnavailable:
                if self.stopping:
                    log.error(
                        "request %s: the queue is unreachable at shutdown; its outcome is not recorded", request.id
                    )
                    return
                log.warning("request %s: holding its outcome until the queue is reachable again", request.id)
                await self._pause(delay)
                delay = min(delay * 2, self.retry_max_s)

    def _cancel_requested(self, request_id: str) -> bool:
        """Whether a cancel was asked for; while the queue is unreachable, none can be heard: the request goes on."""
        try:
            return self.store.cancel_requested(request_id)
        except QueueUnavailable:
            return False

    async def _record_fault(self, request: QueuedRequest, exc: Exception) -> None:
        """Re-queue `request` once, or fail it (at once when its sync caller is waiting), retrying the queue
        write a few times; if the queue still can't be written (a full disk), give up on this request, answer its
        sync caller, and go on with the next (with SQLite it runs again at the next start)."""
        for attempt in range(RECORD_ATTEMPTS):
            try:
                if request.id in self._waiters:  # its caller is waiting: answer now (500), no second run
                    self.fail(request, exc)
                else:
                    self.crashed(request, f"{type(exc).__name__}: {exc}")
                return
            except Exception:
                log.warning("request %s: could not record its failure in the queue", request.id, exc_info=True)
                if attempt + 1 < RECORD_ATTEMPTS:
                    await asyncio.sleep(RECORD_RETRY_S * 2**attempt)
        log.error("request %s: its failure could not be recorded in the queue; going on with the next", request.id)
        waiter = self._waiters.get(request.id)
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _note(self, write: Callable[[], object]) -> None:
        """A log line or progress for a running request: not worth failing the request over (a full disk)."""
        try:
            write()
        except QueueUnavailable:
            pass  # the queue has logged the outage once
        except Exception:
            log.warning("could not record a log line or progress in the queue", exc_info=True)

    def crashed(self, request: QueuedRequest, cause: str) -> None:
        """The worker failed while running `request`: re-queue it, or fail it once it has had MAX_ATTEMPTS."""
        if (request.attempts or 0) < MAX_ATTEMPTS:
            self.store.log(request.id, f"The worker failed ({cause}); the request was re-queued.", "WARNING")
            log.warning("request %s re-queued after a worker failure: %s", request.id, cause)
            self.store.release(request.id, attempt_failed=True)
            return
        message = f"The worker failed on this request {request.attempts} times ({cause}); it is not retried."
        self.store.log(request.id, message, "ERROR")
        log.error("request %s failed: %s", request.id, message)
        self.fail(request, WorkerCrashed(message))

    async def _run(self, request: QueuedRequest) -> None:
        """Run a claimed (IN_PROGRESS) request."""
        request_id_var.set(request.id)
        if (request.attempts or 0) > MAX_ATTEMPTS:  # started that often and never finished: it stops workers
            message = (
                f"The worker stopped while running this request {(request.attempts or 1) - 1} times "
                "(the process died or was stopped); it is not retried."
            )
            self._note(lambda: self.store.log(request.id, message, "ERROR"))
            log.error("request %s failed: %s", request.id, message)
            await self._settle(request, lambda: self.fail(request, WorkerCrashed(message)))
            return
        if request.start_deadline and (request.started_at or 0.0) > request.start_deadline:
            await self._settle(request, lambda: self.fail(request, StartDeadlinePassed()))
            return
        if request.queue_url == SYNC and request.id not in self._waiters:  # queued by a process that has stopped
            gone = Unavailable("The server stopped before this sync request ran; nobody awaits it.")
            await self._settle(request, lambda: self.fail(request, gone))
            return
        endpoint = BY_ID[request.endpoint_id]
        assert request.input is not None, "a claimed request carries its input"
        try:  # a queued body is validated when it runs, as on fal (the submit accepted any JSON)
            body = endpoint.input_model.model_validate_json(request.input)
        except ValidationError as exc:
            line = f"Invalid input: {exc.error_count()} error(s)"
            self._note(lambda: self.store.log(request.id, line, "ERROR"))
            invalid = InvalidBody(json.loads(exc.json(include_url=False)))  # JSON-safe, like FastAPI's
            await self._settle(request, lambda: self.fail(request, invalid))
            return
        started = time.perf_counter()
        try:
            output = await self.service.edit(
                endpoint.profile,
                body,
                request.files_url,
                request.id,
                on_log=lambda message: self._note(lambda: self.store.log(request.id, message)),
                should_cancel=lambda: self.stopping or self._cancel_requested(request.id),
                on_progress=lambda step, total: self._note(lambda: self.store.progress(request.id, step, total)),
            )
        except Cancelled:
            if self.stopping and request.id in self._waiters:  # its caller is answered, not kept waiting
                self.fail(request, Unavailable("The server is stopping: the request was stopped; send it again."))
                return
            if self.stopping:
                log.info("request %s interrupted by shutdown: it goes back to the queue", request.id)
                self.store.release(request.id)
                return
            self._note(lambda: self.store.log(request.id, CANCELLED, "WARNING"))
            await self._settle(request, lambda: self.fail(request, RequestCancelled()))
        except ServerError as exc:  # bad input, refused as configured (Unavailable), or the model failed
            error = exc
            if isinstance(error, InferenceError):
                self._note(lambda: self.store.log(request.id, f"Inference failed: {error}", "ERROR"))
            await self._settle(request, lambda: self.fail(request, error))
        else:
            if self._cancel_requested(request.id):  # a cancel answered 202 just as the last step was checked
                self._note(lambda: self.store.log(request.id, CANCELLED, "WARNING"))
                await self._settle(request, lambda: self.fail(request, RequestCancelled()))
                return
            metrics = {"inference_time": time.perf_counter() - started}
            await self._settle(request, lambda: self.succeed(request, output, metrics))


def elided(url: str) -> str:
    """A data URI shortened to its header: the image went to the sync caller, the queue row needs no copy."""
    return url.partition(",")[0] + ",(returned to the caller)" if url.startswith("data:") else url
