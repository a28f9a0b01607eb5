"""The FastAPI application: routers, error handlers, output files, and the model's lifetime."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

import PIL.Image
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server.config import Settings, parse_keys
from server.files.outputs import OutputStore
from server.files.serving import OutputFiles
from server.files.storage import open_storage
from server.http.auth import require_key
from server.http.body_limit import fal_shaped_413
from server.http.errors import install_error_handlers
from server.http.proxy import fal_proxy
from server.http.quotas import Quotas, enforce_rate_limit
from server.http.responses import GUARDED, TOO_LARGE
from server.http.routes import edit, files, health, metrics, openapi, playground, queue, storage
from server.http.routes.queue import queue_host_routing
from server.logs import request_ids
from server.net.client import outbound_client
from server.queue.connect import open_configured_queue
from server.queue.dispatcher import Dispatcher
from server.queue.heartbeat import advertise, new_worker_id, worker_info
from server.queue.retention import run_retention
from server.queue.webhooks import WebhookSender
from server.service.metrics import Metrics
from server.service.model import load_model, served_profiles
from server.service.runner import InferenceWorker

log = logging.getLogger(__name__)


def create_app(settings: Settings, weights_dir: Path | None, tiny: bool = False) -> FastAPI:
    """An app serving the FLUX.2 weights in `weights_dir`; the model loads in the background at start-up.

    With `weights_dir=None` (and a shared queue, `settings.queue`), the app is an API front-end only: it loads no
    model, queues every request, and `flux2-server worker` processes run them.
    """
    outputs = OutputStore(settings.data_dir, open_storage(settings.storage, settings.data_dir, settings.retention_s))
    # Pillow warns above this many pixels and refuses twice as many; inputs.decode_image refuses above it outright
    PIL.Image.MAX_IMAGE_PIXELS = settings.max_input_pixels

    async def load_in_background(state) -> None:
        """Load the model in the background: /health answers meanwhile, /ready once this is done; requests that
        arrive meanwhile wait for it (`state.model_loaded`)."""
        try:
            editor = await asyncio.to_thread(load_model, settings, weights_dir)
        except Exception as exc:
            log.exception("the model failed to load from %s: /health and /ready answer 503", weights_dir)
            state.model_error = f"{type(exc).__name__}: {exc}"
            return
        state.worker = InferenceWorker(editor, settings.job_timeout_s)
        state.model_loaded.set()

    async def advertise_when_loaded(state, store, worker_id: str, profiles) -> None:
        await state.model_loaded.wait()
        started, worker = time.time(), state.worker
        info = lambda: worker_info(worker, profiles, started)
        await advertise(store, worker_id, info, settings.worker_heartbeat_ttl_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.model_loaded, app.state.model_error = asyncio.Event(), None
        app.state.worker = None
        worker_id = new_worker_id()
        store = open_configured_queue(settings, worker_id)
        app.state.store = store
        loading = None
        if weights_dir is not None:
            loading = asyncio.create_task(load_in_background(app.state), name="load-model")
            requeued = store.requeue_interrupted()
            if requeued:
                log.warning("re-queued %d request(s) left running by the previous server", requeued)
        else:
            log.info(
                "API front-end only: requests are queued on %s for `flux2-server worker` processes", settings.queue
            )
        async with outbound_client(settings) as client:
            app.state.http = client
            webhooks = WebhookSender(client, settings.webhook_backoff_s)
            profiles = served_profiles(settings)
            app.state.dispatcher = Dispatcher(store, app.state, webhooks, profiles)
            tasks = [
                asyncio.create_task(
                    run_retention(store, outputs.storage, settings.retention_s, settings.retention_sweep_every_s),
                    name="retention",
                )
            ]
            dispatching = None
            if weights_dir is not None:  # the dispatcher and the heartbeat wait for the model to load
                dispatching = asyncio.create_task(app.state.dispatcher.run_forever(), name="dispatcher")
                heartbeat = advertise_when_loaded(app.state, store, worker_id, profiles)
                tasks.append(asyncio.create_task(heartbeat, name="heartbeat"))
            yield
            for task in tasks:
                task.cancel()
            if dispatching is not None:
                # Stop taking queued work; a request still running stops at its next step and goes back to the
                # queue (with SQLite: stays IN_PROGRESS and runs again at the next start).
                app.state.dispatcher.stop()
                if not app.state.model_loaded.is_set():  # still loading (or failed): nothing runs
                    dispatching.cancel()
                await asyncio.gather(dispatching, return_exceptions=True)
            await webhooks.close()
            if loading is not None:
                await loading
            if app.state.worker is not None:
                app.state.worker.shutdown()
            store.close()

    app = FastAPI(
        title="flux2-server",
        summary="FLUX.2 [dev] image editing behind fal.ai's HTTP API, on your own GPU.",
        version="0.1.0",
        lifespan=lifespan,
        openapi_url=None,  # served by routes/openapi.py, which also answers fal's `?endpoint_id=`
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.outputs = outputs
    app.state.tiny = tiny
    app.state.front_end = weights_dir is None  # an API front-end: queue workers run the model
    app.state.metrics = Metrics(app.state)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(openapi.router)
    app.include_router(playground.router)
    app.state.api_keys = settings.keys()
    if not app.state.api_keys:
        log.warning("no API keys configured: the API is open to anyone who can reach this port")
    app.state.quotas = Quotas(settings.rate_limit, settings.max_pending_per_key)
    guarded = {"dependencies": [Depends(require_key), Depends(enforce_rate_limit)], "responses": GUARDED}
    body_limit = {"max_body_size": settings.max_body_bytes}  # 413 beyond (server/body_limit.py)
    app.include_router(edit.router, **guarded, **body_limit)
    app.include_router(queue.router, **guarded, **body_limit)
    app.state.pending_uploads = {}
    app.include_router(storage.initiate_router, **guarded, **body_limit)
    # the files themselves: their own limit, and no key (the one-time URL is the permission)
    app.include_router(storage.upload_router, max_body_size=settings.max_upload_bytes, responses=TOO_LARGE)
    app.add_middleware(fal_shaped_413)
    app.add_middleware(queue_host_routing)
    app.add_middleware(fal_proxy)  # a proxied request is rewritten before any other routing
    app.add_middleware(request_ids)
    origins = parse_keys(settings.cors_origins)
    if origins:  # outermost, so browsers' preflight requests are answered before the proxy looks at them
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-fal-request-id"],
        )
    if outputs.files_dir is not None:
        app.mount("/files", OutputFiles(directory=outputs.files_dir), name="files")
    else:
        app.include_router(files.router)  # files in a bucket, streamed through this server
    app.mount("/static", playground.static_files, name="static")
    return app
