"""Runs queued requests one at a time, in order of priority then arrival, and records their outcome. It is the only
caller of the model (through `EditService`): a sync request is queued like any other and its caller awaits it
(`submit_and_wait`: an in-process future, resolved here), so queue positions and the queue depth count every call
waiting for the model.

Around the model, `server.queue.pipeline` keeps it busy: the next requests' inputs are fetched and decoded while
it runs (`Prefetcher`: those requests are reserved in the queue, still IN_QUEUE for clients, and started when a
model loop takes them), and a request's images are encoded and stored after the model let go of it (`OutputStage`),
its result recorded once they are written.

The same logic serves both deployments: inside `flux2-server serve` over the embedded SQLite queue, and inside
each `flux2-server worker` over Redis. It talks to the queue only through `server.queue.backend.QueueBackend`.

A fault outside the model (anything but bad input, a cancel or an `InferenceError`) is treated as the worker
failing on the request: it is logged, the dispatcher goes on, and the request is re-queued once. The queue counts
every start (`attempts`), so a request that brings the whole process down (a segfault, the OOM killer) is failed
when it is claimed a third time, instead of taking down every restart (or every worker) in turn.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from functools import partial

from pydantic import ValidationError

from pipelines import Cancelled
from server.endpoints import BY_ID, ENDPOINTS
from server.errors import (
    CANCELLED,
    InferenceError,
    InvalidBody,
    RequestCancelled,
    ServerError,
    StartDeadlinePassed,
    Unavailable,
    WorkerCrashed,
    answer_for,
)
from server.logs import request_id_var
from server.queue.backend import SYNC, QueueBackend, QueuedRequest
from server.queue.pipeline import MIB, OutputStage, Prefetcher
from server.queue.webhooks import WebhookSender, webhook_payload
from server.schemas import EditInput, EditOutput
from server.service.edit import EditService, Prepared
from server.service.model import ModelState

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # the first run and one re-run after a worker failure
RECORD_ATTEMPTS = 3  # tries to record a request's fault in the queue (a full disk, a locked database) ...
RECORD_RETRY_S = 0.5  # ... this long apart, doubling; then the request is given up and the dispatcher goes on


class Dispatcher:
    def __init__(
        self,
        store: QueueBackend,
        service: EditService,
        webhooks: WebhookSender | None,
        profiles: list[str] | None = None,
    ):
        self.store = store
        self.service = service
        self.webhooks = webhooks
        # the endpoints this dispatcher takes requests for: those whose profile its model runs (default: all)
        self.endpoint_ids = [e.endpoint_id for e in ENDPOINTS if profiles is None or e.profile in profiles]
        self._wakeup = asyncio.Event()
        self.stopping = False
        # sync requests queued by this process, by id: their callers await these (never through the queue row)
        self._waiters: dict[str, asyncio.Future[EditOutput]] = {}
        self.running = False  # in its loop (after the model loaded)
        self.died: str | None = None  # why the loop ended other than by `stop` (/health and /ready say so)
        settings = service.settings
        self.prefetcher = Prefetcher(
            store,
            self.endpoint_ids,
            self._prefetch,
            settings.prefetch_requests,
            settings.prefetch_memory_mib * MIB,
            self._wakeup,
        )
        self.outputs = OutputStage(settings.encode_threads, settings.output_async)

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
        self._wakeup.set()
        self.prefetcher.stop()

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
        """Cancel a queued request at once, or ask a running one to stop at its next step; False if finished."""
        if self.fail(request, RequestCancelled(), only_if_queued=True):
            self.store.log(request.id, CANCELLED, "WARNING")
            self.prefetcher.discard(request.id)  # if its inputs were being fetched ahead: it never runs
            return True
        current = self.store.get(request.id)
        if current is not None and current.status == "IN_PROGRESS":
            self.store.request_cancel(request.id)
            return True
        return False

    def notify(self) -> None:
        """Something was queued."""
        self._wakeup.set()

    async def run_forever(self) -> None:
        await self.service.model.settled()  # queued requests wait (in the store) while the model loads
        if self.service.model.state is not ModelState.LOADED:
            return  # it failed to load: nothing runs here, /health and /ready say why
        self.running = True
        # one loop per replica (`serve --gpus`): each takes the next prepared request when its model is free
        replicas = getattr(self.service.model.runner, "replicas", 1)
        self.outputs.backlog = 2 * replicas
        prefetching = asyncio.create_task(self.prefetcher.run(), name="prefetch")
        try:
            await asyncio.gather(prefetching, *(self._loop() for _ in range(replicas)))
        except BaseException as exc:
            if not self.stopping:
                self.died = f"{type(exc).__name__}: {exc}"
                log.critical("the dispatcher stopped: %s; no request runs until the server is restarted", self.died)
            raise
        finally:
            self.running = False
            self.prefetcher.stop()
            prefetching.cancel()
            await asyncio.gather(prefetching, return_exceptions=True)
            await self.prefetcher.close()  # requests reserved ahead go back to the queue
            await self.outputs.drain()  # what the model finished is written and recorded

    async def _loop(self) -> None:
        while not self.stopping:
            ticket = await self.prefetcher.take()
            if ticket is None:  # the prefetcher stopped (with the dispatcher, or it failed)
                return
            request = ticket.request
            try:
                if self._start(request, ticket.lines):
                    await self._run(request, ticket.prepared)
            except Exception as exc:  # a fault outside the model (or writing to the queue): the worker failed here
                log.exception("request %s failed outside the model", request.id)
                await self._record_fault(request, exc)
            await self.outputs.room()

    def _start(self, request: QueuedRequest, lines: list[str]) -> bool:
        """A reserved request is IN_PROGRESS now (its attempt counted), with `lines` (from preparing it) in its log;
        False if it finished meanwhile (cancelled)."""
        if not self.store.start(request.id):
            return False
        request.status, request.started_at, request.attempts = "IN_PROGRESS", time.time(), (request.attempts or 0) + 1
        for line in lines:
            self._note(partial(self.store.log, request.id, line))
        return True

    async def _prefetch(self, request: QueuedRequest, on_message: Callable[[str], None]) -> Prepared | None:
        """A reserved request's inputs, fetched and decoded while the model runs another (`Prefetcher`). A request
        that can't run (past its start deadline, its sync caller gone, an invalid body, inputs that fail: a 422)
        ends here, started and failed at once, without the model: None."""
        request_id_var.set(request.id)
        lines: list[str] = []

        def line(message: str) -> None:  # to the request's log once it starts
            log.info("request %s: %s", request.id, message)
            lines.append(message)
            on_message(message)

        error: ServerError | None = None
        try:
            error = self._refusal(request, time.time(), attempts=False)
            if error is None:
                return await self.service.prepare(
                    BY_ID[request.endpoint_id].profile,
                    self._body(request),
                    request.files_url,
                    line,
                )
        except ServerError as exc:  # bad inputs (422), or refused as configured (503)
            error = exc
        except Exception as exc:  # a fault outside the model: counted as a start, so it can't loop forever
            log.exception("request %s failed outside the model", request.id)
            if self._start(request, lines):
                await self._record_fault(request, exc)
            return None
        if error is not None and self._start(request, lines):  # IN_PROGRESS, then COMPLETED with its error, at once
            self.fail(request, error)
        return None

    def _refusal(self, request: QueuedRequest, now: float, attempts: bool = True) -> ServerError | None:
        """Why a request must not run, known before its model call; None if it may."""
        if attempts and (request.attempts or 0) > MAX_ATTEMPTS:  # started that often and never finished
            message = (
                f"The worker stopped while running this request {(request.attempts or 1) - 1} times "
                "(the process died or was stopped); it is not retried."
            )
            self.store.log(request.id, message, "ERROR")
            log.error("request %s failed: %s", request.id, message)
            return WorkerCrashed(message)
        if request.start_deadline and now > request.start_deadline:
            return StartDeadlinePassed()
        if request.queue_url == SYNC and request.id not in self._waiters:  # queued by a process that has stopped
            return Unavailable("The server stopped before this sync request ran; nobody awaits it.")
        return None

    def _body(self, request: QueuedRequest) -> EditInput:
        """The request's validated input; InvalidBody (422) if it does not validate."""
        endpoint = BY_ID[request.endpoint_id]
        assert request.input is not None, "a claimed request carries its input"
        try:  # a queued body is validated when it runs, as on fal (the submit accepted any JSON)
            return endpoint.input_model.model_validate_json(request.input)
        except ValidationError as exc:
            self.store.log(request.id, f"Invalid input: {exc.error_count()} error(s)", "ERROR")
            raise InvalidBody(json.loads(exc.json(include_url=False))) from None  # JSON-safe, like FastAPI's

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

    async def _run(self, request: QueuedRequest, prepared: Prepared | None = None) -> None:
        """Run a claimed (IN_PROGRESS) request; `prepared`: its inputs, if they were fetched while it waited. Once the
        model let go of it, the rest (encode, store, record) goes on in the output stage (`output_async`) while
        this returns; a fault outside the model before then is raised here."""
        request_id_var.set(request.id)
        refusal = self._refusal(request, request.started_at or 0.0)
        if refusal is not None:
            self.fail(request, refusal)
            return
        try:
            body = prepared.body if prepared is not None else self._body(request)
        except InvalidBody as exc:
            self.fail(request, exc)
            return
        started = time.perf_counter()
        model_done = asyncio.Event()
        editing = asyncio.ensure_future(
            self.service.edit(
                BY_ID[request.endpoint_id].profile,
                body,
                request.files_url,
                request.id,
                on_log=lambda message: self._note(lambda: self.store.log(request.id, message)),
                should_cancel=lambda: self.stopping or self.store.cancel_requested(request.id),
                on_progress=lambda step, total: self._note(lambda: self.store.progress(request.id, step, total)),
                prepared=prepared,
                on_model_done=model_done.set,
                pool=self.outputs.pool,
            )
        )
        let_go = asyncio.ensure_future(model_done.wait())
        try:
            await asyncio.wait({editing, let_go}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            editing.cancel()
            raise
        finally:
            let_go.cancel()
        if editing.done() or not self.outputs.asynchronous:
            await self._settle(request, editing, started)
        else:  # the model is free: the next request runs while this one's images are encoded and stored
            self.outputs.add(self._settle_beside(request, editing, started), name=f"output-{request.id}")

    async def _settle_beside(self, request: QueuedRequest, editing: asyncio.Future[EditOutput], started: float):
        request_id_var.set(request.id)
        try:
            await self._settle(request, editing, started)
        except Exception as exc:  # writing the files or the queue failed: as a fault in the loop
            log.exception("request %s failed outside the model", request.id)
            await self._record_fault(request, exc)

    async def _settle(self, request: QueuedRequest, editing: asyncio.Future[EditOutput], started: float) -> None:
        """Record how `editing` (the edit service's call) ended; a fault outside the model is raised."""
        try:
            output = await editing
        except Cancelled:
            if self.stopping and request.id in self._waiters:  # its caller is answered, not kept waiting
                self.fail(request, Unavailable("The server is stopping: the request was stopped; send it again."))
                return
            if self.stopping:
                log.info("request %s interrupted by shutdown: it goes back to the queue", request.id)
                self.store.release(request.id)
                return
            self.store.log(request.id, CANCELLED, "WARNING")
            self.fail(request, RequestCancelled())
        except ServerError as exc:  # bad input, refused as configured (Unavailable), or the model failed
            if isinstance(exc, InferenceError):
                self.store.log(request.id, f"Inference failed: {exc}", "ERROR")
            self.fail(request, exc)
        else:
            self.succeed(request, output, {"inference_time": time.perf_counter() - started})


def elided(url: str) -> str:
    """A data URI shortened to its header: the image went to the sync caller, the queue row needs no copy."""
    return url.partition(",")[0] + ",(returned to the caller)" if url.startswith("data:") else url
