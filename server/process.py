"""The services of one process, typed and built in one place: `serve` (server.http.app's lifespan) and
`flux2-server worker` (server.cli.worker) both open them with `open_services`.

    settings ─┬─ model (lifecycle: loading → loaded | failed; "none" on an API front-end)
              ├─ edits: EditService (prepare → run → finish), the only caller of the model
              ├─ dispatcher: runs queued requests through `edits`, records outcomes, sends webhooks
              ├─ store: the queue (SQLite, or Redis shared with other processes)
              └─ outputs, http (outbound client), metrics, quotas
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import PIL.Image

from server.config import Settings
from server.files.outputs import Encoding, OutputStore
from server.files.storage import open_storage
from server.net.client import outbound_client
from server.queue.backend import QueueBackend
from server.queue.connect import open_configured_queue
from server.queue.coverage import Coverage
from server.queue.dispatcher import Dispatcher
from server.queue.heartbeat import advertise, new_worker_id, worker_info
from server.queue.webhook_signing import WebhookSigner
from server.queue.webhooks import WebhookSender
from server.service.edit import EditService
from server.service.metrics import Metrics
from server.service.model import Model, ModelState, served_profiles
from server.service.quotas import Quotas


@dataclass
class Services:
    settings: Settings
    tiny: bool  # the tiny random-weight model (its images are noise)
    model: Model
    store: QueueBackend
    outputs: OutputStore
    metrics: Metrics
    quotas: Quotas
    http: httpx.AsyncClient
    edits: EditService
    dispatcher: Dispatcher
    api_keys: list[str]  # every key that opens the API, operator keys included
    worker_id: str  # this process in the queue (its consumer name, its heartbeat)
    profiles: list[str]  # the profiles the model here serves
    webhook_signer: WebhookSigner  # its public key: GET /.well-known/jwks.json
    operator_keys: list[str] = field(default_factory=list)  # keys that see every caller's requests
    coverage: Coverage | None = None  # an API front-end on a shared queue: the profiles live workers serve

    async def heartbeat(self) -> None:
        """Once the model is loaded, advertise this process as a worker until cancelled."""
        await self.model.settled()
        if self.model.state is not ModelState.LOADED:
            return
        started, runner = time.time(), self.model.runner
        # out_of_rotation: why it takes no request now (its circuit breaker, a hung step), or None
        info = lambda: {
            **worker_info(runner, self.profiles, started),
            "out_of_rotation": self.dispatcher.out_of_rotation(),
        }
        await advertise(self.store, self.worker_id, info, self.settings.worker_heartbeat_ttl_s)


def open_outputs(settings: Settings) -> OutputStore:
    storage = open_storage(settings.storage, settings.data_dir, settings.retention_s)
    return OutputStore(settings.data_dir, storage, Encoding(settings.png_encoder, settings.png_compress_level))


@asynccontextmanager
async def open_services(
    settings: Settings, weights_dir: Path | None, tiny: bool = False, outputs: OutputStore | None = None
) -> AsyncIterator[Services]:
    """Open the queue, the outbound client and the rest; closed in reverse order on exit. The model starts
    LOADING (the caller loads it: `services.model.load`), or ELSEWHERE with `weights_dir=None` (an API front-end)."""
    # Pillow warns above this many pixels and refuses twice as many; inputs.decode_image refuses above it outright
    PIL.Image.MAX_IMAGE_PIXELS = settings.max_input_pixels
    worker_id = new_worker_id()
    store = open_configured_queue(settings, worker_id)
    model = Model(ModelState.LOADING if weights_dir is not None else ModelState.ELSEWHERE)
    outputs = outputs or open_outputs(settings)
    metrics = Metrics(model, store.queued_count)
    profiles = served_profiles(settings)
    try:
        async with outbound_client(settings) as client:
            signer = WebhookSigner.load_or_create(settings.data_dir, settings.webhook_user_id)
            webhooks = WebhookSender(
                client,
                store,
                signer,
                settings.webhook_backoff_s,
                settings.webhook_attempts,
                settings.webhook_resume_every_s,
                settings.webhook_timeout_s,
            )
            webhooks.start()  # and picks up deliveries a stopped process left
            edits = EditService(settings, model, outputs, client, metrics)
            try:
                yield Services(
                    settings=settings,
                    tiny=tiny,
                    model=model,
                    store=store,
                    outputs=outputs,
                    metrics=metrics,
                    quotas=Quotas(settings.rate_limit, settings.max_pending_per_key),
                    http=client,
                    edits=edits,
                    dispatcher=Dispatcher(store, edits, webhooks, profiles, settings.queue_retry_max_s),
                    api_keys=settings.keys(),
                    operator_keys=settings.operators(),
                    worker_id=worker_id,
                    profiles=profiles,
                    webhook_signer=signer,
                    coverage=Coverage(store, settings.worker_heartbeat_ttl_s, settings.queue_unserved_timeout_s)
                    if weights_dir is None and store.distributed
                    else None,
                )
            finally:
                await webhooks.close()
    finally:
        model.shutdown()
        store.close()
