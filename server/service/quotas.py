"""Per-key rate and concurrency limits, answered with 429.

A caller is its API key when keys are configured (a hash of it: the key itself is not kept here), else its
client address. The rate limit (FLUX2_RATE_LIMIT, in the `limits` library's notation, e.g. "20/second;600/minute")
counts every call to an API route, in a moving window (`limits`' MovingWindowRateLimiter, in memory). The
concurrency limit (FLUX2_MAX_PENDING_PER_KEY) counts a caller's sync edits in flight plus its queued requests
not yet completed (looked up in the queue, so it holds wherever they run). Both are per API process, and requests
accepted by a previous run (or another front-end) are not counted.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import contextmanager

import limits
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from server.errors import TooManyRequests


class Quotas:
    def __init__(self, rate_limit: str | None, max_pending: int | None):
        self.rates = limits.parse_many(rate_limit) if rate_limit else []
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self.max_pending = max_pending
        # caller -> {request id: the queue holding it (counted until COMPLETED there), or None (a sync edit)}
        self._pending: dict[str, dict] = defaultdict(dict)

    async def hit(self, who: str) -> None:
        for rate in self.rates:
            if not await self._limiter.hit(rate, who):
                stats = await self._limiter.get_window_stats(rate, who)
                retry = max(1, math.ceil(stats.reset_time - time.time()))
                raise TooManyRequests(
                    f"Rate limit exceeded: at most {rate} for this API key. Retry in {retry} s.", retry
                )

    def claim(self, who: str, request_id: str, store=None) -> None:
        """Count a request against its caller's concurrency limit, or refuse it with 429. With `store` (the queue),
        the request is queued and counts until the queue records it COMPLETED, whichever process runs it."""
        if self.max_pending is not None:
            pending = self._pending[who]
            for rid, queue in list(pending.items()):  # forget queued requests that have completed
                if queue is not None and getattr(queue.get(rid), "status", "COMPLETED") == "COMPLETED":
                    del pending[rid]
            if len(pending) >= self.max_pending:
                raise TooManyRequests(
                    f"Too many requests in progress: at most {self.max_pending} queued or running per API key. "
                    "Retry when one completes.",
                    1,
                )
            pending[request_id] = store
        if not self._pending[who]:
            del self._pending[who]

    def release(self, who: str, request_id: str) -> None:
        pending = self._pending.get(who, {})
        pending.pop(request_id, None)
        if not pending:
            self._pending.pop(who, None)

    @contextmanager
    def slot(self, who: str, request_id: str):
        """A sync edit run by this process: counts while it runs."""
        self.claim(who, request_id)
        try:
            yield
        finally:
            self.release(who, request_id)
