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
from pathlib import Path

from server.cli.startup import resolve_weights, runtime_problem, settings_from
from server.config import Settings

log = logging.getLogger(__name__)


async def run_worker(settings: Settings, weights_dir: Path, tiny: bool) -> None:
    # imported here: `flux2-server`'s own start (and its supervisor process) loads no model code
    from server.process import open_services
    from server.service.model import ModelState

    # Its metrics are counted here; this process serves no /metrics (the front-ends do not see them).
    async with open_services(settings, weights_dir, tiny) as services:
        await services.model.load(settings, weights_dir)
        if services.model.state is not ModelState.LOADED:
            raise RuntimeError(f"the model failed to load: {services.model.error}")  # the supervisor starts it again
        heartbeat = asyncio.create_task(services.heartbeat(), name="heartbeat")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, services.dispatcher.stop)
        device = services.model.runner.editor.capabilities().device
        log.info("worker %s serving %s from %s on %s", services.worker_id, services.profiles, weights_dir, device)
        await services.dispatcher.run_forever()
        log.info("worker %s stopping", services.worker_id)
        heartbeat.cancel()


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
