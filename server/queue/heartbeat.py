"""Workers advertise themselves in the queue (profiles, device, dtype, capabilities, busy) with a heartbeat that
expires when they die; /health lists the live ones."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid

from server.errors import QueueUnavailable
from server.queue.backend import QueueBackend
from server.service.replicas import ReplicaRunner
from server.service.runner import ModelRunner

log = logging.getLogger(__name__)


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def advertise(store: QueueBackend, worker_id: str, info, ttl_s: float) -> None:
    """Heartbeat: renew this worker's advertisement (`info()`) three times per TTL."""
    while True:
        try:
            store.heartbeat(worker_id, info(), ttl_s)
        except QueueUnavailable:
            pass  # Redis down or restarting: the queue logs it once
        except Exception as exc:  # noqa: BLE001 -- the queue being briefly unreachable must not end the worker
            log.warning("heartbeat failed: %s", exc)
        await asyncio.sleep(ttl_s / 3)


def worker_info(runner: ModelRunner, profiles: list[str], started: float) -> dict:
    """What a worker advertises (JSON): where it runs, what it serves, whether it is busy, what it can do."""
    caps = runner.editor.capabilities()
    several = {"replicas": runner.describe()} if isinstance(runner, ReplicaRunner) else {}  # --gpus
    return {
        **several,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "profiles": profiles,
        "device": caps.device,
        "dtype": caps.dtype,
        "busy": runner.waiting > 0,
        "started_at": started,
        "capabilities": caps.as_dict(),
    }
