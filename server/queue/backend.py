"""The queue as the routes, the dispatcher and /health see it, whichever backend carries it.

Two backends implement `QueueBackend`: `server.queue.sqlite_queue.RequestStore` (SQLite under the data directory, the
default: one process serves the API and runs the model) and `server.queue.redis_queue.RedisQueue` (Redis Streams: API
front-ends and GPU workers in separate processes, on separate machines). `server.queue.connect.open_queue` picks one from a URL.

Lifecycle of a request: `add` (IN_QUEUE) -> `claim` by a dispatcher that can run its endpoint (IN_PROGRESS) ->
`complete` (COMPLETED, exactly once, and only by the holder of the request's current claim: a worker whose claim
lapsed while it stalled is fenced off). The dispatcher claims in two steps: `claim(..., reserve=True)` (held,
still IN_QUEUE while its inputs are fetched ahead of the model) then `start` (IN_PROGRESS when the model takes
it). `release` gives a claimed request back when its dispatcher stops (or its
worker failed on it). Every claim counts an attempt, so a request that brings its worker down every time is
failed after `dispatcher.MAX_ATTEMPTS` starts instead of being run forever.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection
from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

PRIORITIES = {"normal": 0, "low": 1}  # fal's X-Fal-Queue-Priority values, in the order they are served
SYNC = ""  # the queue_url of a sync request whose caller awaits it in this process (no one polls it)


@dataclass
class QueuedRequest:
    seq: int
    id: str
    endpoint_id: str
    input: str | None  # the validated input as JSON: loaded by `claim` only (status reads never touch it)
    priority: int
    status: str
    queue_url: str
    files_url: str
    webhook_url: str | None
    start_deadline: float | None
    created_at: float
    started_at: float | None
    completed_at: float | None
    status_code: int | None
    result: dict | None  # the result body (output or fal error shape), decoded once where the row is read
    error: str | None
    error_type: str | None
    metrics: dict | None  # timings of the run, decoded likewise
    attempts: int | None = 0  # times claimed; a claim given back by a graceful stop is not counted
    progress_step: int | None = None  # denoising steps done, of progress_total (while running, and after)
    progress_total: int | None = None
    # who submitted it: the SHA-256 of its API key (server/http/auth.py; never the key), None on an open API (and for
    # requests queued before owners were recorded). Status, result and cancel answer only to that key or an operator.
    owner: str | None = None

    @property
    def urls(self) -> dict[str, str]:
        """fal's response_url (`{queue}/fal-ai/flux-2/requests/{id}`), with status_url and cancel_url below it."""
        base = f"{self.queue_url}/requests/{self.id}"
        return {"response_url": base, "status_url": base + "/status", "cancel_url": base + "/cancel"}

    @classmethod
    def from_mapping(cls, values: dict) -> QueuedRequest:
        """From a row or record holding (at least) this class's fields; other keys are ignored."""
        known: dict[str, Any] = {f.name: values.get(f.name) for f in fields(cls)}
        for name in ("result", "metrics"):  # stored as JSON text by both backends; callers get the values
            if isinstance(known[name], str | bytes):
                known[name] = json.loads(known[name])
        request = cls(**known)
        request.attempts = int(request.attempts or 0)
        return request


@runtime_checkable
class QueueBackend(Protocol):
    """Requests, their status, logs, results and cancel flags; live workers. Calls are short and synchronous
    (they run on the event loop, like the SQLite store always has), except `wait_for_work`."""

    distributed: bool  # True: the requests are run by worker processes elsewhere, not by this one

    def add(
        self,
        request_id: str,
        endpoint_id: str,
        input_json: str,
        priority: int,
        queue_url: str,
        files_url: str,
        webhook_url: str | None,
        start_timeout_s: float | None,
        owner: str | None = None,
    ) -> None:
        """Accept a request (IN_QUEUE); durable before it returns. `owner`: see `QueuedRequest.owner`."""

    def get(self, request_id: str) -> QueuedRequest | None:
        """The request's record without its input (`input` None): what status, result and cancel read. Inputs
        (data URIs up to the body limit) are stored apart and read only by `claim`."""

    def position(self, request: QueuedRequest) -> int:
        """How many queued requests will be served before this one."""

    def queued_count(self) -> int:
        """Requests accepted and not started yet."""

    def queued_ids(self, endpoint_ids: Collection[str]) -> list[str]:
        """The requests for `endpoint_ids` not started yet (at most a thousand per endpoint)."""

    def claim(self, endpoint_ids: Collection[str], reserve: bool = False) -> QueuedRequest | None:
        """The next queued request for one of `endpoint_ids` (priority, then arrival), now IN_PROGRESS and owned
        by the caller, with its input; None if there is none.

        With `reserve` the request stays IN_QUEUE for everyone else (its status, its queue position and the
        requests behind it unchanged; a cancel finishes it at once) while the caller holds it, to fetch its inputs
        while its model runs another request (`server.queue.pipeline`); kept from other workers like a claim
        (Redis: renewed until `start`, `release` or `complete`). Its attempt is counted when it starts."""

    def start(self, request_id: str) -> bool:
        """A request the caller reserved is IN_PROGRESS now (`started_at` set); False if it was finished meanwhile
        (cancelled) or is no longer the caller's."""

    async def wait_for_work(self, wakeup: asyncio.Event, timeout_s: float) -> None:
        """Return when work may have arrived, `wakeup` is set, or after `timeout_s`."""

    async def wait_completed(self, request_id: str, timeout_s: float) -> None:
        """Return when `request_id` may have completed (a sync caller waiting on another process), or after
        `timeout_s`; the caller checks."""

    def release(self, request_id: str, attempt_failed: bool = False) -> None:
        """A claimed request must run again: its dispatcher is stopping (the claim is not counted as an attempt), or
        the worker failed while running it (`attempt_failed`: counted, see Dispatcher.crashed; other workers, if
        any, take it first)."""

    def complete(
        self,
        request_id: str,
        status_code: int,
        result: dict,
        error: str | None = None,
        error_type: str | None = None,
        metrics: dict | None = None,
        only_if_queued: bool = False,
        webhook: dict | None = None,
        webhook_lease_s: float = 0.0,
    ) -> bool:
        """Record the outcome once: False if it already has one (or, with `only_if_queued`, has started), or if a
        worker holds the request's claim and the caller does not (fenced). With `webhook`, its delivery is kept in
        the same atomic step (as `save_webhook`, leased to the caller for `webhook_lease_s`): a recorded outcome
        never lacks its pending webhook, and a run that is not recorded sends none."""

    def log(self, request_id: str, message: str, level: str = "INFO") -> None: ...

    def progress(self, request_id: str, step: int, total: int) -> None:
        """The running request has done `step` of `total` denoising steps (status's `progress`)."""

    def logs(self, request_id: str) -> list[dict]:
        """fal's log objects: message, level, source, timestamp (ISO 8601, UTC)."""

    def request_cancel(self, request_id: str) -> None:
        """Ask whichever process runs this request to stop it at its next step."""

    def cancel_requested(self, request_id: str) -> bool:
        """Whether the running request should stop at its next step (cancelled, or `lease_lost`)."""

    def lease_lost(self, request_id: str) -> bool:
        """True once another worker took over a request this process claimed (its claim lapsed while it stalled):
        this process must not record an outcome for it (`complete` refuses) and stops running it."""

    def requeue_interrupted(self) -> int:
        """At start-up: put requests a stopped server left running back in the queue; returns how many."""

    def purge(self, completed_before: float) -> int:
        """Delete requests completed before this time, with their logs; returns how many."""

    def heartbeat(self, worker_id: str, info: dict, ttl_s: float) -> None:
        """A worker says it is alive (and what it can run) for the next `ttl_s` seconds."""

    def workers(self) -> list[dict]:
        """Live workers: the `info` of each heartbeat not yet expired, with its `id`."""

    def health(self) -> dict | None:
        """/health's `queue` (a shared queue: reachable, and whether Redis came back empty and what was lost then;
        a fixed number of calls, whatever the queue holds), or None (the embedded queue has nothing to say)."""

    def add_upload(self, token: str, upload: dict, ttl_s: float) -> None:
        """An upload begun through the storage emulation (`upload`: JSON, e.g. the file's name and type), for
        any front-end to finish within `ttl_s`."""

    def get_upload(self, token: str) -> dict | None:
        """The upload begun as `token`; None when there is none or it expired."""

    def add_upload_part(self, token: str, number: int, data: bytes) -> int:
        """Keep one part of a multipart upload (a part sent again replaces it); returns the bytes kept so far."""

    def upload_parts(self, token: str) -> dict[int, bytes]:
        """The parts kept for `token`, by number."""

    def upload_part_sizes(self, token: str) -> dict[int, int]:
        """The size of each part kept for `token`, by number (without reading the parts)."""

    def pending_upload_bytes(self) -> int:
        """Bytes of all parts kept for multipart uploads not finished (nor expired)."""

    def remove_upload(self, token: str) -> bool:
        """The upload is finished (or abandoned): forget it and its parts. False if it was already gone (another
        call took it first)."""

    def save_webhook(self, request_id: str, delivery: dict, lease_s: float) -> None:
        """Keep the pending webhook delivery of `request_id` (JSON: URL, body, attempts made, when next), leased to
        this process for `lease_s` (no other process takes it meanwhile)."""

    def webhook_done(self, request_id: str) -> None:
        """The webhook of `request_id` was delivered (or given up): forget it."""

    def take_webhooks(self, lease_s: float) -> list[dict]:
        """The pending deliveries whose lease ran out (the process that made them stopped), now leased to the
        caller for `lease_s`."""

    def close(self) -> None: ...
