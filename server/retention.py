"""Retention: finished requests, their logs, and files under /files/ are deleted once older than the configured age.

Files go by age alone (their modification time), so outputs of the sync endpoints and uploads through the
storage emulation, which no queue row records, are cleaned up as well as queue outputs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from server.queue_backend import QueueBackend

log = logging.getLogger(__name__)


def sweep(store: QueueBackend, files_dir: Path, max_age_s: float) -> tuple[int, int]:
    """Delete what is older than `max_age_s`; returns (requests, files) removed."""
    cutoff = time.time() - max_age_s
    requests = store.purge(cutoff)
    old_files = [f for f in files_dir.iterdir() if f.is_file() and f.stat().st_mtime < cutoff]
    for path in old_files:
        path.unlink(missing_ok=True)
    return requests, len(old_files)


async def run_retention(store: QueueBackend, files_dir: Path, max_age_s: float, every_s: float) -> None:
    while True:
        requests, files = await asyncio.to_thread(sweep, store, files_dir, max_age_s)
        if requests or files:
            log.info("retention: removed %d request(s) and %d file(s) older than %.0f s", requests, files, max_age_s)
        await asyncio.sleep(every_s)
