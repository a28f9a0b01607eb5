"""The stages around the model, so that it never waits for the CPU or the network:

    queue ──claim(reserve=True)──► Prefetcher ──take──► model loop(s) ──hand off──► OutputStage ──► result recorded
                                   fetch, size-check,     (Dispatcher:    the model      encode, store,
                                   decode the inputs      start, run)     is free now    then record, webhook

- `Prefetcher` keeps up to `prefetch_requests` requests reserved beyond those the model loops wait for, their inputs
  fetched and decoded (`EditService.prepare`, through the dispatcher's `prepare` callback; a request's URLs side by
  side, the requests ahead one after another), and reserves no more while the decoded images it holds reach
  `prefetch_memory_mib` (so it holds at most one request's images beyond the cap). A reserved request is still IN_QUEUE for
  clients (status, queue position, cancel; `QueueBackend.claim`) and kept from other workers. One prefetcher feeds
  all of a dispatcher's model loops (`serve --gpus`: one per replica), so no replica waits while requests another
  would have run sit prepared. A loop takes the held request served first (priority, then arrival), waiting for its
  inputs if they are not ready yet. A request that arrives with a higher priority than those already held runs after
  them (at most `prefetch_requests` of them). At a stop, what it holds goes back to the queue (`release`).
- A sync request's **head start** (`Prefetcher.head_start`): when one arrives while the model is idle (`idle`: a
  model loop waits in `take` with nothing held or started for it), its inputs are prepared at once from the body the
  route validated, while the queue stores it (`Dispatcher.submit_and_wait`: `add` on a thread). When the prefetcher
  reserves that request it adopts the preparation under way instead of starting one (the model starts
  max(store, prepare) after the route, not store + claim + parse + prepare). A head start counts against the same
  bounds (one per idle loop, and counted as a held request being prepared: nothing more is reserved ahead
  meanwhile; none while the worker is busy, where the prefetcher hides a request's preparation behind the running
  model anyway; none with `prefetch_requests=0`); one never adopted (its caller went away, the store failed, the
  server stops) is cancelled and its scratch files removed (`abandon`, `close`).
- `OutputStage` runs what is left of a request once the model let go of it (encoding and storing its images on a
  small thread pool, a request's images side by side; then recording the result and sending its webhook) while the
  model loop takes the next request. Its backlog is bounded: a model loop waits before taking the next request
  while `backlog` requests are still being written.

With `prefetch_requests=0` and `output_async=False` a request runs end to end before the next is taken (a sync one
stored first, then claimed and prepared).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from server.errors import QueueUnavailable
from server.queue.backend import QueueBackend, QueuedRequest
from server.service.edit import Prepared

log = logging.getLogger(__name__)

MIB = 1024 * 1024
IDLE_RECHECK_S = 1.0  # an idle prefetcher looks at the queue at least this often
OUTAGE_RETRY_S = 0.5  # the queue unreachable: the first wait before trying again (doubling up to retry_max_s)


def image_bytes(prepared: Prepared) -> int:
    """Memory of a prepared request's decoded input images."""
    return sum(image.width * image.height * len(image.getbands()) for image in prepared.call.images)


@dataclass(eq=False)
class HeadStart:
    """A sync request's inputs being prepared from its in-memory body before the queue has it (see the module's
    docstring): `task` gives its `Prepared`; `lines` for its log, written when it starts, as a prefetched one's."""

    request_id: str
    task: asyncio.Task[Prepared] = field(repr=False)
    lines: list[str] = field(default_factory=list)
    taken: bool = False  # its Prepared went to the prefetcher's ticket, which owns it now

    async def result(self, on_message: Callable[[str], None]) -> Prepared:
        """Its Prepared, once ready (its error raised), its lines passed on to `on_message`; owned by the caller then."""
        try:
            prepared = await self.task
        finally:
            for line in self.lines:
                on_message(line)
            self.lines.clear()
        self.taken = True
        return prepared

    def let_go(self) -> None:
        """Not adopted after all: stop preparing, and remove what it prepared (its scratch files), now or when it ends."""
        if not self.taken:
            self.task.cancel()
            self.task.add_done_callback(_discard_prepared)


def _discard_prepared(task: asyncio.Task[Prepared]) -> None:
    if not task.cancelled() and task.exception() is None:  # reading the exception: it was seen (not logged as lost)
        task.result().discard()


@dataclass(eq=False)
class Ticket:
    """A request reserved by the prefetcher: preparing, then ready (`prepared`) for a model loop to take."""

    request: QueuedRequest
    prepared: Prepared | None = None
    bytes: int = 0
    task: asyncio.Task | None = field(default=None, repr=False)
    # lines for the request's log from preparing it, written when it starts: while it waits its log stays empty
    lines: list[str] = field(default_factory=list)


class Prefetcher:
    def __init__(
        self,
        store: QueueBackend,
        endpoint_ids: Collection[str],
        prepare: Callable[[QueuedRequest, Callable[[str], None], HeadStart | None], Awaitable[Prepared | None]],
        depth: int,
        memory_cap_bytes: int,
        wakeup: asyncio.Event,
        may_claim: Callable[[], bool] = lambda: True,
        retry_max_s: float = 30.0,
    ):
        """`prepare(request, on_message, head_start)`: ready a reserved request's inputs (from its `head_start`, if it
        had one), or end the request (start it and record its error) and return None. `wakeup`: set when work may
        have arrived (`Dispatcher.notify`)."""
        self.store = store
        self.endpoint_ids = endpoint_ids
        self.prepare = prepare
        self.depth = depth
        self.memory_cap_bytes = memory_cap_bytes
        self.wakeup = wakeup
        self.may_claim = may_claim  # False while the worker is out of rotation (its breaker open, a step hung)
        self.retry_max_s = retry_max_s  # the longest wait between tries while the queue is unreachable
        self.held: list[Ticket] = []  # reserved, not yet taken by a model loop
        self.head_starts: dict[str, HeadStart] = {}  # by request id: sync requests prepared before it reserves them
        self.waiting_loops = 0  # model loops waiting in `take`
        self.stopping = False
        self._changed = asyncio.Event()  # a ticket became ready, or stopping

    def held_bytes(self) -> int:
        return sum(ticket.bytes for ticket in self.held)

    def idle(self) -> bool:
        """Whether a request arriving now would wait for nothing but its own inputs: a model loop waits in `take`
        with nothing held (ready or being prepared) or head-started for it, within the bounds (`depth` > 0, the
        images held under the cap), and the worker in rotation."""
        ahead = len(self.held) + len(self.head_starts)
        return (
            self.depth > 0
            and not self.stopping
            and self.may_claim()
            and self.waiting_loops > ahead
            and self.held_bytes() < self.memory_cap_bytes
        )

    def head_start(
        self, request_id: str, prepare: Callable[[Callable[[str], None]], Coroutine[Any, Any, Prepared]]
    ) -> HeadStart | None:
        """If `idle`, begin `prepare(on_message)` for `request_id` (not in the queue yet) at once, to be adopted when
        it is reserved; else None (it is prepared when reserved, as any request). Whoever began it calls `abandon`
        once it is no longer waited for (a no-op once adopted)."""
        if not self.idle():
            return None
        lines: list[str] = []
        task = asyncio.create_task(prepare(lines.append), name=f"head-start-{request_id}")
        head = self.head_starts[request_id] = HeadStart(request_id, task, lines)
        return head

    def abandon(self, request_id: str) -> None:
        """`request_id`'s head start, if not adopted yet, will never be: cancel it and remove its scratch files."""
        head = self.head_starts.pop(request_id, None)
        if head is not None:
            head.let_go()

    def _wants_more(self) -> bool:
        """One request for each model loop waiting, whatever it holds; ahead of them, up to `depth` more, one
        preparation at a time (a request's size is known once decoded), while the images held stay under the cap.
        Head starts not adopted yet count as held requests being prepared."""
        if self.stopping or not self.may_claim():
            return False
        if len(self.held) < self.waiting_loops:  # also how a head-started request, once stored, is adopted
            return True
        preparing = self.head_starts or any(ticket.prepared is None for ticket in self.held)
        return (
            not preparing
            and len(self.held) + len(self.head_starts) < self.depth + self.waiting_loops
            and self.held_bytes() < self.memory_cap_bytes
        )

    async def run(self) -> None:
        """Reserve and prepare requests until `stop`."""
        delay = OUTAGE_RETRY_S
        while not self.stopping:
            self.wakeup.clear()
            empty = False
            while self._wants_more():
                try:
                    request = self.store.claim(self.endpoint_ids, True)  # reserve: stays IN_QUEUE until it starts
                    delay = OUTAGE_RETRY_S
                except QueueUnavailable:  # Redis down or restarting (logged by the queue): try again, less often
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.retry_max_s)
                    continue
                except Exception:
                    log.exception("could not read the queue; trying again in %.0f s", IDLE_RECHECK_S)
                    await asyncio.sleep(IDLE_RECHECK_S)
                    continue
                if request is None:
                    empty = True
                    break
                ticket = Ticket(request)
                head = self.head_starts.pop(request.id, None)  # a sync request's preparation under way: adopted
                ticket.task = asyncio.create_task(self._prepare(ticket, head), name=f"prefetch-{request.id}")
                self.held.append(ticket)
            try:
                if empty:
                    await self.store.wait_for_work(self.wakeup, IDLE_RECHECK_S)
                else:  # holding all it may: until a loop takes one, a preparation ends, or new work
                    await asyncio.wait_for(self.wakeup.wait(), IDLE_RECHECK_S)
            except TimeoutError:
                pass
            except QueueUnavailable:
                await asyncio.sleep(IDLE_RECHECK_S)
            except Exception:
                log.exception("could not wait for the queue; trying again in %.0f s", IDLE_RECHECK_S)
                await asyncio.sleep(IDLE_RECHECK_S)

    async def _prepare(self, ticket: Ticket, head: HeadStart | None = None) -> None:
        prepared = None
        try:
            prepared = await self.prepare(ticket.request, ticket.lines.append, head)
        except Exception:  # `prepare` ends the requests it can't ready; this is a fault in that (the queue down)
            log.exception("request %s: could not prepare it; it goes back to the queue", ticket.request.id)
            try:
                self.store.release(ticket.request.id)
            except Exception:
                log.warning("could not give request %s back to the queue", ticket.request.id, exc_info=True)
        finally:
            if prepared is None:  # ended without the model (refused, bad inputs), or let go (cancelled, stopping)
                self._drop(ticket)
            else:
                ticket.prepared, ticket.bytes = prepared, image_bytes(prepared)
            self._changed.set()
            self.wakeup.set()

    def _drop(self, ticket: Ticket) -> None:
        if ticket in self.held:
            self.held.remove(ticket)
            self.wakeup.set()

    async def take(self) -> Ticket | None:
        """The held request served first (priority, then arrival) once its inputs are ready, waiting for it; None
        once stopping."""
        self.waiting_loops += 1
        self.wakeup.set()  # a loop is free: reserve for it even beyond `depth`
        try:
            while not self.stopping:
                self._changed.clear()
                first = min(self.held, key=lambda t: (t.request.priority, t.request.seq), default=None)
                if first is not None and first.prepared is not None:
                    self._drop(first)
                    return first
                await self._changed.wait()
            return None
        finally:
            self.waiting_loops -= 1

    def discard(self, request_id: str) -> None:
        """`request_id` was finished while held (a queued cancel): stop preparing it and let it go."""
        self.abandon(request_id)
        for ticket in list(self.held):
            if ticket.request.id == request_id:
                if ticket.task is not None:
                    ticket.task.cancel()
                if ticket.prepared is not None:
                    ticket.prepared.discard()  # its scratch files (downloaded LoRAs)
                self._drop(ticket)

    def stop(self) -> None:
        self.stopping = True
        self._changed.set()
        self.wakeup.set()

    async def give_back(self) -> None:
        """Give back what it holds (the worker went out of rotation): other workers take those requests."""
        if self.held:
            await self.close()
            self._changed.set()

    async def close(self) -> None:
        """Give back what it holds: each request goes back to the queue, not counted as an attempt. Head starts not
        adopted yet are cancelled (their requests, if stored, are prepared again by whoever runs them)."""
        held, self.held = self.held, []
        heads, self.head_starts = list(self.head_starts.values()), {}
        for head in heads:
            head.let_go()
        tasks = [ticket.task for ticket in held if ticket.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *(head.task for head in heads), return_exceptions=True)
        await asyncio.sleep(0)  # their done callbacks (`let_go`: scratch files removed) run before this returns
        for ticket in held:
            if ticket.prepared is not None:
                ticket.prepared.discard()  # prepared again by whoever runs it
            try:
                self.store.release(ticket.request.id)
            except Exception:
                log.warning("could not give request %s back to the queue", ticket.request.id, exc_info=True)
        if held:
            log.info("%d prefetched request(s) went back to the queue", len(held))


class OutputStage:
    """What is left of requests the model let go of, run beside it (see the module's docstring)."""

    def __init__(self, threads: int, asynchronous: bool, backlog: int = 2):
        # the threads encoding and storing output images (EditService.finish -> OutputStore.save)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="flux2-encode")
        self.asynchronous = asynchronous
        self.backlog = backlog
        self._tasks: set[asyncio.Task] = set()

    def add(self, work: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(work)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def room(self) -> None:
        """Return once fewer than `backlog` requests are being written."""
        while len(self._tasks) >= self.backlog:
            await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)

    async def drain(self) -> None:
        """Return once every request handed off is written and recorded."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))
