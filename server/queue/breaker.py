"""A worker's circuit breaker: after `threshold` failures in a row that are the worker's own (its model failing
every job, a storage bucket it can't write: `server.errors.WORKERS_FAULTS`), it takes no request for `cooldown_s`,
and says so in its heartbeat (`/health`: `out_of_rotation`). Then it tries one request: a success closes the
breaker, a failure opens it again. Failures that are the request's (bad input, a cancel) neither count nor reset.

Replicate's director does the same with a model that keeps failing; here the requests the worker failed go back to
the shared queue for other workers (`QueueBackend.release`), within the attempts limit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class CircuitBreaker:
    threshold: int  # failures in a row that open it; 0: never
    cooldown_s: float
    failures: int = 0  # the worker's failures since its last success
    reason: str | None = None  # the last of them
    open_until: float = 0.0  # time.time(): out of rotation until then

    def failed(self, reason: str) -> None:
        self.failures += 1
        self.reason = reason
        if self.threshold and self.failures >= self.threshold:
            self.open_until = time.time() + self.cooldown_s
            log.error(
                "this worker takes no request for %g s: %d failures in a row that are its own; the last: %s",
                self.cooldown_s,
                self.failures,
                reason,
            )

    def succeeded(self) -> None:
        if self.open_until:
            log.info("this worker is back in rotation")
        self.failures, self.reason, self.open_until = 0, None, 0.0

    def wait_s(self) -> float:
        """Seconds until the worker may take a request (0: now)."""
        return max(0.0, self.open_until - time.time())

    def describe(self) -> dict | None:
        """What the heartbeat says while it is out of rotation (None while it takes requests)."""
        if not self.wait_s():
            return None
        return {"reason": self.reason, "failures": self.failures, "until": self.open_until}
