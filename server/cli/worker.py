"""`flux2-server worker`: one GPU's model taking requests from the shared queue; no HTTP of its own.

It runs the same `Dispatcher` as the embedded server, over the Redis queue: it claims only requests for the
profiles it serves, writes output files to the configured storage, sends webhooks, and advertises itself
(profiles, device, dtype, capabilities) with a heartbeat that expires when it dies.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from server.cli.process import resolve_weights, runtime_problem, settings_from
from server.config import Settings
from server.files.outputs import OutputStore
from server.files.storage import open_storage
from server.net.client import outbound_client
from server.queue.connect import open_configured_queue
from server.queue.dispatcher import Dispatcher
from server.queue.heartbeat import advertise, new_worker_id, worker_info
from server.queue.webhooks import WebhookSender
from server.service.metrics import Metrics
from server.service.model import load_model, served_profiles
from server.service.runner import InferenceWorker

log = logging.getLogger(__name__)


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


def cmd_worker(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if not settings.queue:
        print("error: a worker needs the shared queue: pass --queue redis://HOST:PORT/DB", file=sys.stderr)
        return 2
    resolved = resolve_weights(settings)
    if isinstance(resolved, int):
        return resolved
    problem = runtime_problem(settings, resolved[0])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    asyncio.run(run_worker(settings, *resolved))
    return 0
