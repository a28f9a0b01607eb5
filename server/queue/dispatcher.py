"""Runs queued requests one at a time, in order of priority then arrival, and records their outcome. It is the only
caller of the model (through `EditService`): a sync request is queued like any other and its caller awaits it
(`submit_and_wait`: an in-process future, resolved here), so queue positions and the queue depth count every call
waiting for the model.

Around the model, `server.queue.pipeline` keeps it busy: the next requests' inputs are fetched and decoded while
it runs (`Prefetcher`: those requests are reserved in the queue, still IN_QUEUE for clients, and started when a
model loop takes them), and a request's images are encoded and stored after the model let go of it (`OutputStage`),
its result recorded once they are written. A sync request that arrives while the model is idle gets a head start: its
inputs are prepared from the body the route validated while the queue stores it (`submit_and_wait`).

The same logic serves both deployments: inside `flux2-server serve` over the embedded SQLite queue, and inside
each `flux2-server worker` over Redis. It talks to the queue only through `server.queue.backend.QueueBackend`.

A fault outside the model (anything but bad input, a cancel or an `InferenceError`) is treated as the worker
failing on the request: it is logged, the dispatcher goes on, and the request is re-queued once. The queue counts
every start (`attempts`), so a request that brings the whole process down (a segfault, the OOM killer) is failed
when it is claimed a third time, instead of taking down every restart (or every worker) in turn.

A queue that can't be reached (`QueueUnavailable`: Redis down or restarting) is waited out, for as long as it
takes: the running request goes on (a cancel can't be heard meanwhile), its outcome is held here and recorded when
the queue is back, and the loop tries again, its waits doubling up to `retry_max_s`.

On a shared queue (Redis), failures that are the worker's own (`server.errors.WORKERS_FAULTS`: the model failing, a
configuration that can't serve the request) re-queue the request for another worker too, and feed the worker's
circuit breaker (server/queue/breaker.py), which takes it out of rotation after several in a row. A step that runs
past FLUX2_STEP_TIMEOUT_S fails its job at once (the step watchdog), and the worker takes nothing new until the
step returns. An outcome is recorded only by the holder of the request's claim: a worker whose claim lapsed (it
stalled, another worker took the request over) stops at its next step, and deletes the files it wrote if it got
that far.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    QueueUnavailable,
    RequestCancelled,
    ServerError,
    StartDeadlinePassed,
    StepTimedOut,
    Unavailable,
    WorkerCrashed,
    answer_for,
    workers_fault,
)
from server.logs import request_id_var
from server.queue.backend import SYNC, QueueBackend, QueuedRequest
from server.queue.breaker import CircuitBreaker
from server.queue.pipeline import IDLE_RECHECK_S, MIB, HeadStart, OutputStage, Prefetcher
from server.queue.webhooks import WebhookSender, webhook_payload
from server.schemas import EditInput, EditOutput
from server.service.edit import EditService, Prepared
from server.service.model import ModelState

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # the first run and one re-run after a worker failure
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
        # ... and their validated bodies: a sync request's row in the queue holds no input (`routes.queue.admit`)
        self._sync_bodies: dict[str, EditInput] = {}
        self.running = False  # in its loop (after the model loaded)
        self.died: str | None = None  # why the loop ended other than by `stop` (/health and /ready say so)
        settings = service.settings
        # on a shared queue only: with the embedded one, no other worker would take the requests over
        self.breaker = CircuitBreaker(
            settings.breaker_failures if store.distributed else 0, settings.breaker_cooldown_s
        )
        self._given_up: set[str] = set()  # runs the step watchdog failed: they stop at their next step
        self._hung: dict[str, float] = {}  # ... and, until their step returns, since when (time.time())
        self.prefetcher = Prefetcher(
            store,
            self.endpoint_ids,
            self._prefetch,
            settings.prefetch_requests,
            settings.prefetch_memory_mib * MIB,
            self._wakeup,
            may_claim=self._in_rotation,
            retry_max_s=retry_max_s,
        )
        self.outputs = OutputStage(settings.encode_threads, settings.output_async)

    async def submit_and_wait(
        self,
        request_id: str,
        add: Callable[[], None],
        profile: str,
        body: EditInput,
        base_url: str,
    ) -> EditOutput:
        """A sync request: `add` queues it (as `request_id`, its row without the input: `body`, validated by its
        route, is kept here); its caller waits here for its output, or the error it ended in (raised). The output
        goes to the caller, not into the queue row.

        A request that arrives while the model is idle gets a head start (`Prefetcher.head_start`): its inputs are
        prepared from `body` (with its endpoint's `profile` and the `base_url` of its files) at once, while `add`
        stores it on a thread; the prefetcher adopts that preparation when it reserves the request. Otherwise (the
        worker busy, `prefetch_requests=0`) `add` runs here, on the event loop."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = waiter
        self._sync_bodies[request_id] = body
        head = self.prefetcher.head_start(request_id, partial(self._prepare_ahead, request_id, profile, body, base_url))
        try:
            if head is None:
                add()
            else:
                await self._add_beside(request_id, add)
            self.notify()
            return await waiter
        finally:
            self._waiters.pop(request_id, None)
            self._sync_bodies.pop(request_id, None)
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # ended after its caller went (its cancel): seen, not logged as lost
            self.prefetcher.abandon(request_id)  # a head start not adopted (the caller went away, `add` failed)

    async def _prepare_ahead(
        self, request_id: str, profile: str, body: EditInput, base_url: str, on_message: Callable[[str], None]
    ) -> Prepared:
        """A sync request's head start: `EditService.prepare` with the body its route validated."""
        request_id_var.set(request_id)
        return await self.service.prepare(profile, body, base_url, on_message)

    async def _add_beside(self, request_id: str, add: Callable[[], None]) -> None:
        """`add` on a thread (SQLite: the insert and its fsync; the store serializes its connection behind a lock),
        the event loop free meanwhile for the head start. The caller cancelled meanwhile (it went away): a thread
        can't be stopped, so the request is stored anyway, then cancelled here, as `await_sync` does."""
        adding = asyncio.ensure_future(asyncio.to_thread(add))
        try:
            await asyncio.shield(adding)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await adding
            stored = self.store.get(request_id) if adding.done() and adding.exception() is None else None
            if stored is not None:
                self.cancel(stored)
            raise

    def stop(self) -> None:
        """Take no more work and stop the running request at its next step; the queue gets it back
        (`QueueBackend.release`) to run again."""
        self.stopping = True
        self._stopped.set()
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
        """Record a request's outcome and send its webhook (kept in the queue with the outcome, in one step); False
        if it had already finished (or started, with `only_if_queued`), or this worker's claim on it was taken over."""
        delivery = None
        if request.webhook_url and self.webhooks is not None:
            delivery = self.webhooks.delivery(request.webhook_url, webhook_payload(request.id, status_code, result))
        lease_s = self.webhooks.lease_s(delivery) if self.webhooks is not None and delivery is not None else 0.0
        if not self.store.complete(
            request.id, status_code, result, error, error_type, metrics, only_if_queued, delivery, lease_s
        ):
            return False
        outcome = "ok" if status_code == 200 else error_type or "internal_error"  # error_type: from answer_for
        mode = "sync" if request.id in self._waiters else "queue"
        self.service.metrics.job_finished(request.endpoint_id, mode, outcome, time.time() - request.created_at)
        if delivery is not None and self.webhooks is not None:
            self.webhooks.deliver(delivery)
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
        if not self.finish(request, 200, result, metrics=metrics):
            self.discard(request, output)
            return
        self.breaker.succeeded()
        if waiter is not None and not waiter.done():
            waiter.set_result(output)

    def discard(self, request: QueuedRequest, output: EditOutput) -> None:
        """This run's outcome was not recorded (the request was taken over by another worker while this one stalled,
        or failed by the step watchdog): delete the files it wrote, which nothing refers to."""
        names = [image.file_name for image in output.images if image.file_name and not image.url.startswith("data:")]
        for name in names:
            try:
                self.service.outputs.storage.delete(name)
            except Exception:
                log.warning("request %s: could not delete the output file %s", request.id, name, exc_info=True)
        log.warning(
            "request %s: this run's result was not recorded (%s); its %d output file(s) were deleted",
            request.id,
            "another worker took the request over" if self.store.lease_lost(request.id) else "it already had one",
            len(names),
        )

    def out_of_rotation(self) -> dict | None:
        """Why this worker takes no request now (its heartbeat, /health), or None while it does."""
        if self._hung:
            request_id, since = next(iter(self._hung.items()))
            reason = f"a step of request {request_id} has not returned (the step watchdog failed the request)"
            return {"reason": reason, "since": since, "until": None}
        return self.breaker.describe()

    def cancel(self, request: QueuedRequest) -> bool:
        """Cancel a queued request at once, or ask a running one to stop at its next step; False if finished, or
        too far to stop: every denoising step done (decoding, encoding, storing), it completes as it is."""
        if self.fail(request, RequestCancelled(), only_if_queued=True):
            self.store.log(request.id, CANCELLED, "WARNING")
            self.prefetcher.discard(request.id)  # if its inputs were being fetched ahead: it never runs
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
            if not self._in_rotation():  # out of rotation: other workers take the requests meanwhile
                await self.prefetcher.give_back()
                await self._pause(min(self.breaker.wait_s() or IDLE_RECHECK_S, IDLE_RECHECK_S))
                continue
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

    def _in_rotation(self) -> bool:
        """Whether this worker takes requests now: not while its breaker is open or a step hangs."""
        return not self._hung and not self.breaker.wait_s()

    def _start(self, request: QueuedRequest, lines: list[str]) -> bool:
        """A reserved request is IN_PROGRESS now (its attempt counted), with `lines` (from preparing it) in its log;
        False if it finished meanwhile (cancelled)."""
        if not self.store.start(request.id):
            return False
        request.status, request.started_at, request.attempts = "IN_PROGRESS", time.time(), (request.attempts or 0) + 1
        for line in lines:
            self._note(partial(self.store.log, request.id, line))
        return True

    async def _prefetch(
        self, request: QueuedRequest, on_message: Callable[[str], None], head: HeadStart | None = None
    ) -> Prepared | None:
        """A reserved request's inputs, fetched and decoded while the model runs another (`Prefetcher`), or those its
        `head` start prepares (a sync request: from the body its route validated, not the stored JSON). A request
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
            if error is None and head is not None:
                return await head.result(line)
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
        finally:
            if head is not None:
                head.let_go()  # unless its Prepared was returned: refused, failed or cancelled, its files removed
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
            self._note(lambda: self.store.log(request.id, message, "ERROR"))
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
        if request.id in self._sync_bodies:  # a sync request awaited here: its route validated it, the row has none
            return self._sync_bodies[request.id]
        assert request.input is not None, "a claimed request carries its input"
        try:  # a queued body is validated when it runs, as on fal (the submit accepted any JSON)
            return endpoint.input_model.model_validate_json(request.input)
        except ValidationError as exc:
            self.store.log(request.id, f"Invalid input: {exc.error_count()} error(s)", "ERROR")
            raise InvalidBody(json.loads(exc.json(include_url=False))) from None  # JSON-safe, like FastAPI's

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
        if self._taken_over(request):
            return
        self.breaker.failed(cause)
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
            await self._settle(request, lambda: self.fail(request, refusal))
            return
        try:
            body = prepared.body if prepared is not None else self._body(request)
        except InvalidBody as exc:
            invalid = exc
            await self._settle(request, lambda: self.fail(request, invalid))
            return
        started = time.perf_counter()
        stepped = [time.monotonic()]  # when the run began, then when its last step ended: the step watchdog's clock

        def on_progress(step: int, total: int) -> None:
            stepped[0] = time.monotonic()
            self._note(lambda: self.store.progress(request.id, step, total))  # renews the claim too

        model_done = asyncio.Event()
        editing = asyncio.ensure_future(
            self.service.edit(
                BY_ID[request.endpoint_id].profile,
                body,
                request.files_url,
                request.id,
                on_log=lambda message: self._note(lambda: self.store.log(request.id, message)),
                should_cancel=lambda: (
                    self.stopping or request.id in self._given_up or self._cancel_requested(request.id)
                ),
                on_progress=on_progress,
                prepared=prepared,
                on_model_done=model_done.set,
                pool=self.outputs.pool,
            )
        )
        if not await self._watched(request, editing, model_done, stepped):
            return  # the step watchdog failed it
        if editing.done() or not self.outputs.asynchronous:
            await self._conclude(request, editing, started)
        else:  # the model is free: the next request runs while this one's images are encoded and stored
            self.outputs.add(self._conclude_beside(request, editing, started), name=f"output-{request.id}")

    async def _conclude_beside(self, request: QueuedRequest, editing: asyncio.Future[EditOutput], started: float):
        request_id_var.set(request.id)
        try:
            await self._conclude(request, editing, started)
        except Exception as exc:  # writing the files or the queue failed: as a fault in the loop
            log.exception("request %s failed outside the model", request.id)
            await self._record_fault(request, exc)

    async def _conclude(self, request: QueuedRequest, editing: asyncio.Future[EditOutput], started: float) -> None:
        """Record how `editing` (the edit service's call) ended; a fault outside the model is raised."""
        try:
            output = await editing
        except Cancelled:
            if self.store.lease_lost(request.id):  # another worker runs it now: nothing to record here
                log.warning("request %s: stopped, another worker took it over while this one stalled", request.id)
                return
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
            await self._settle(request, lambda: self.failed(request, error))
        else:
            if self._cancel_requested(request.id):  # a cancel answered 202 just as the last step was checked
                self._note(lambda: self.store.log(request.id, CANCELLED, "WARNING"))
                await self._settle(request, lambda: self.fail(request, RequestCancelled()))
                return
            metrics = {"inference_time": time.perf_counter() - started}
            await self._settle(request, lambda: self.succeed(request, output, metrics))

    def failed(self, request: QueuedRequest, exc: ServerError) -> None:
        """A run ended in `exc`. The worker's own failure (`workers_fault`) counts in its breaker and, on a shared
        queue, sends the request to another worker (within MAX_ATTEMPTS, and not when its sync caller waits here);
        anything else fails the request."""
        if self._taken_over(request):
            return
        if not workers_fault(exc):
            self.fail(request, exc)
            return
        cause = answer_for(exc).message
        self.breaker.failed(cause)
        retry = self.store.distributed and request.id not in self._waiters and not isinstance(exc, StepTimedOut)
        if retry and (request.attempts or 0) < MAX_ATTEMPTS:
            self.store.log(request.id, f"This worker failed on the request ({cause}); it was re-queued.", "WARNING")
            log.warning("request %s re-queued for another worker: %s", request.id, cause)
            self.store.release(request.id, attempt_failed=True)
            return
        self.fail(request, exc)

    def _taken_over(self, request: QueuedRequest) -> bool:
        """Whether another worker took `request` over while this one stalled: nothing of this run is recorded."""
        if not self.store.lease_lost(request.id):
            return False
        log.warning("request %s: this run is not recorded: another worker took the request over", request.id)
        return True

    async def _watched(
        self, request: QueuedRequest, editing: asyncio.Future[EditOutput], model_done: asyncio.Event, stepped: list
    ) -> bool:
        """Wait until the model lets go of `editing` (or it ends), unless one of its steps takes longer than
        FLUX2_STEP_TIMEOUT_S (`stepped[0]`: when the last one ended): then the step watchdog fails the request
        (StepTimedOut), this loop takes nothing new until the step returns (the run then stops: `_given_up`), and
        False is returned."""
        bound = self.service.settings.step_timeout_s
        let_go = asyncio.ensure_future(model_done.wait())
        try:
            while not (editing.done() or let_go.done()):
                left = stepped[0] + bound - time.monotonic() if bound else None
                if left is not None and left <= 0:
                    break
                waited: set[asyncio.Future] = {editing, let_go}
                await asyncio.wait(waited, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            else:
                return True
        except asyncio.CancelledError:
            editing.cancel()
            raise
        finally:
            let_go.cancel()
        exc = StepTimedOut(f"a step ran longer than {bound:g} s (FLUX2_STEP_TIMEOUT_S): the worker hangs")
        self._note(lambda: self.store.log(request.id, str(exc), "ERROR"))
        log.error("request %s: %s; no new request here until the step returns", request.id, exc)
        self._given_up.add(request.id)
        await self._settle(request, lambda: self.failed(request, exc))
        self._hung[request.id] = time.time()
        try:
            while not editing.done() and not self.stopping:
                await asyncio.wait({editing}, timeout=IDLE_RECHECK_S)
        finally:
            self._hung.pop(request.id, None)
            self._given_up.discard(request.id)
        if editing.done() and not editing.cancelled() and editing.exception() is None:
            self.discard(request, editing.result())  # it finished after all: its files are not the recorded result
        return False


def elided(url: str) -> str:
    """A data URI shortened to its header: the image went to the sync caller, the queue row needs no copy."""
    return url.partition(",")[0] + ",(returned to the caller)" if url.startswith("data:") else url
