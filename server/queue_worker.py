"""`flux2-server worker`: one GPU's model taking requests from the shared queue; no HTTP of its own.

It runs the same `Dispatcher` as the embedded server, over the Redis queue: it claims only requests for the
profiles it serves, writes output files to the configured storage, sends webhooks, and advertises itself
(profiles, device, dtype, capabilities) with a heartbeat that expires when it dies.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

from server.config import Settings
from server.dispatcher import Dispatcher
from server.file_storage import open_storage
from server.metrics import Metrics
from server.model import load_model, served_profiles
from server.outbound import outbound_client
from server.outputs import OutputStore
from server.queue_backend import QueueBackend, open_configured_queue
from server.webhooks import WebhookSender
from server.worker import InferenceWorker

log = logging.getLogger(__name__)


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def advertise(store: QueueBackend, worker_id: str, info, ttl_s: float) -> None:
    """Heartbeat: renew this worker's advertisement (`info()`) three times per TTL."""
    while True:
        try:
            store.heartbeat(worker_id, info(), ttl_s)
        except Exception as exc:  # noqa: BLE001 -- the queue being briefly unreachable must not end the worker
            log.warning("heartbeat failed: %s", exc)
        await asyncio.sleep(ttl_s / 3)


def worker_info(worker: InferenceWorker, profiles: list[str], started: float) -> dict:
    caps = worker.editor.capabilities()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "profiles": profiles,
        "device": caps.get("device"),
        "dtype": caps.get("dtype"),
        "busy": worker.waiting > 0,
        "started_at": started,
        "capabilities": caps,
    }


async def run_worker(settings: Settings, weights_dir: Path, tiny: bool) -> None:
    profiles = served_profiles(settings)
    worker_id = new_worker_id()
    store = open_configured_queue(settings, worker_id)
    editor = await asyncio.to_thread(load_model, settings, weights_dir)
    worker = InferenceWorker(editor, settings.job_timeout_s)
    started = time.time()
    async with outbound_client(settings) as client:
        state = SimpleNamespace(
            worker=worker,
            http=client,
            settings=settings,
            outputs=OutputStore(
                settings.data_dir, open_storage(settings.storage, settings.data_dir, settings.retention_s)
            ),
            tiny=tiny,
            model_loaded=asyncio.Event(),  # loaded above: the dispatcher need not wait
        )
        state.model_loaded.set()
        state.metrics = Metrics(state)  # counted here; this process serves no /metrics (the front-ends do not see it)
        webhooks = WebhookSender(client, settings.webhook_backoff_s)
        dispatcher = Dispatcher(store, state, webhooks, profiles)
        heartbeat = asyncio.create_task(
            advertise(store, worker_id, lambda: worker_info(worker, profiles, started), settings.worker_heartbeat_ttl_s)
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, dispatcher.stop)
        log.info(
            "worker %s serving %s from %s on %s", worker_id, profiles, weights_dir, editor.capabilities()["device"]
        )
        await dispatcher.run_forever()
        log.info("worker %s stopping", worker_id)
        heartbeat.cancel()
        await webhooks.close()
    worker.shutdown()
    store.close()
