"""Retention: finished requests, their logs, and files under /files/ are deleted once older than the configured age.

Files go by age alone (their modification time), so outputs of the sync endpoints and uploads through the
storage emulation, which no queue row records, are cleaned up as well as queue outputs.
"""

from __future__ import annotations

import asyncio
import logging
import time

from server.files.storage import FileStorage
from server.queue.backend import QueueBackend

log = logging.getLogger(__name__)


def sweep(store: QueueBackend, files: FileStorage, max_age_s: float) -> tuple[int, int]:
    """Delete what is older than `max_age_s`; returns (requests, files) removed."""
    cutoff = time.time() - max_age_s
    return store.purge(cutoff), files.sweep(cutoff)


async def run_retention(store: QueueBackend, files: FileStorage, max_age_s: float, every_s: float) -> None:
    while True:
        requests, files_removed = await asyncio.to_thread(sweep, store, files, max_age_s)
        if requests or files_removed:
            log.info(
                "retention: removed %d request(s) and %d file(s) older than %.0f s", requests, files_removed, max_age_s
            )
        await asyncio.sleep(every_s)
