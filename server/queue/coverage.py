"""Which profiles the live workers serve, as an API front-end sees them (shared queue, no model of its own).

A submit for a profile no live worker serves would wait in the queue for a worker that may never come, so it is
refused at once: 503 with Retry-After (fal's error shape), which fal's clients raise and a caller can retry on.
A worker that was serving the profile a moment ago (its advertisement lapsed in a Redis restart, a FLUSHALL or a
rolling restart) still counts for one heartbeat TTL. Requests already queued for a profile whose last worker has
gone are failed with that 503 once it has gone unserved for FLUX2_QUEUE_UNSERVED_TIMEOUT_S (`expire_unserved`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from server.endpoints import ENDPOINTS, Endpoint
from server.errors import QueueUnavailable, Unavailable
from server.queue.backend import QueueBackend

log = logging.getLogger(__name__)


class NoWorker(Unavailable):
    """No live worker serves the request's profile: a 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}


class Coverage:
    def __init__(self, store: QueueBackend, grace_s: float, timeout_s: float):
        self.store = store
        self.grace_s = grace_s  # a worker seen this recently still counts (one heartbeat TTL)
        self.timeout_s = timeout_s
        self.started = time.monotonic()
        self.last_served: dict[str, float] = {}  # profile -> when a live worker last advertised it

    def look(self) -> None:
        """Read the live workers (a fixed number of queue calls) and note what they serve."""
        now = time.monotonic()
        for worker in self.store.workers():
            for profile in worker.get("profiles") or ():
                self.last_served[profile] = now

    def unserved_for(self, profile: str) -> float:
        """Seconds since a live worker last served `profile` (since this process started, if never)."""
        return time.monotonic() - self.last_served.get(profile, self.started)

    def check(self, endpoint: Endpoint) -> None:
        """Refuse a submit for `endpoint` (NoWorker) when no live worker serves its profile."""
        self.look()
        if endpoint.profile not in self.last_served or self.unserved_for(endpoint.profile) > self.grace_s:
            raise NoWorker(
                f"No worker serves {endpoint.endpoint_id} at the moment (profile '{endpoint.profile}'); "
                "try again later",
                self.grace_s,
            )


async def expire_unserved(coverage: Coverage, fail, every_s: float) -> None:
    """Every `every_s`: fail (`fail(request, error)`, Dispatcher.fail with only_if_queued) the queued requests of
    each profile no live worker has served for `coverage.timeout_s`."""
    while True:
        await asyncio.sleep(every_s)
        try:
            coverage.look()
            for endpoint in ENDPOINTS:
                waited = coverage.unserved_for(endpoint.profile)
                if waited <= coverage.timeout_s:
                    continue
                message = f"No worker served profile '{endpoint.profile}' for {waited:.0f} s; send it again later"
                for request_id in coverage.store.queued_ids([endpoint.endpoint_id]):
                    request = coverage.store.get(request_id)
                    if request is not None and fail(request, Unavailable(message)):
                        log.warning("request %s failed: %s", request_id, message)
        except QueueUnavailable:
            pass  # the queue logs its outage; the next round looks again
