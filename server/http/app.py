"""The FastAPI application: routers, error handlers, middleware, output files; its lifespan opens the process's
services (server.process), loads the model in the background and runs the dispatcher."""

from __future__ import annotations

import asyncio
import functools
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server.config import Settings, parse_keys
from server.files.serving import OutputFiles
from server.http.auth import require_key
from server.http.body_limit import fal_shaped_413
from server.http.callers import enforce_rate_limit
from server.http.errors import install_error_handlers
from server.http.hosts import HostNames, host_guard
from server.http.json_body import check_json_body
from server.http.openai_errors import OPENAI_ERRORS, openai_compatible
from server.http.proxy import fal_proxy
from server.http.responses import GUARDED, LOW_ON_DISK, TOO_LARGE
from server.http.routes import edit, files, health, metrics, openai, openapi, playground, queue, storage
from server.http.routes.queue import queue_host_routing
from server.http.timing import server_timing
from server.logs import redacted, request_ids
from server.process import open_outputs, open_services
from server.queue.coverage import expire_unserved
from server.queue.retention import run_retention
from server.service.model import ModelState

log = logging.getLogger(__name__)


def create_app(settings: Settings, weights_dir: Path | None, tiny: bool = False) -> FastAPI:
    """An app serving the FLUX.2 weights in `weights_dir`; the model loads in the background at start-up.

    With `weights_dir=None` (and a shared queue, `settings.queue`), the app is an API front-end only: it loads no
    model, queues every request, and `flux2-server worker` processes run them.
    """
    outputs = open_outputs(settings)  # opened now: local files are mounted under /files below

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with open_services(settings, weights_dir, tiny, outputs) as services:
            app.state.services = services
            store, dispatcher = services.store, services.dispatcher
            loading = None
            if weights_dir is not None:
                # /health answers meanwhile, /ready once loaded; requests that arrive meanwhile wait for it
                loading = asyncio.create_task(services.model.load(settings, weights_dir), name="load-model")
                requeued = store.requeue_interrupted()
                if requeued:
                    log.warning("re-queued %d request(s) left running by the previous server", requeued)
            else:
                log.info(
                    "API front-end only: requests are queued on %s for `flux2-server worker` processes",
                    redacted(settings.queue or ""),
                )
            retention = run_retention(store, outputs.storage, settings.retention_s, settings.retention_sweep_every_s)
            tasks = [asyncio.create_task(retention, name="retention")]
            if services.coverage is not None:  # queued requests for a profile no live worker serves expire
                # and, at least every half heartbeat TTL, what the live workers serve is noted: a worker whose
                # advertisement lapsed (a FLUSHALL, a Redis restart) still counts until it heartbeats again
                every_s = max(
                    0.5, min(settings.queue_unserved_timeout_s / 2, 30.0, settings.worker_heartbeat_ttl_s / 2)
                )
                fail = functools.partial(dispatcher.fail, only_if_queued=True)
                expiring = expire_unserved(services.coverage, fail, every_s)
                tasks.append(asyncio.create_task(expiring, name="expire-unserved"))
            dispatching = None
            if weights_dir is not None:  # the dispatcher and the heartbeat wait for the model to load
                dispatching = asyncio.create_task(dispatcher.run_forever(), name="dispatcher")
                tasks.append(asyncio.create_task(services.heartbeat(), name="heartbeat"))
            yield
            for task in tasks:
                task.cancel()
            if dispatching is not None:
                # Stop taking queued work; a request still running stops at its next step and goes back to the
                # queue (with SQLite: stays IN_PROGRESS and runs again at the next start).
                dispatcher.stop()
                if services.model.state is not ModelState.LOADED:  # still loading (or failed): nothing runs
                    dispatching.cancel()
                await asyncio.gather(dispatching, return_exceptions=True)
            if loading is not None:
                await loading

    app = FastAPI(
        title="flux2-server",
        summary="FLUX.2 [dev] image editing behind fal.ai's HTTP API, on your own GPU.",
        version="0.1.0",
        lifespan=lifespan,
        openapi_url=None,  # served by routes/openapi.py, which also answers fal's `?endpoint_id=`
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(openapi.router)
    app.include_router(playground.router)
    if not settings.keys():
        log.warning("no API keys configured: the API is open to anyone who can reach this port")
    elif not settings.public_url:  # URLs are not built from whatever Host arrives (server/http/hosts.py)
        log.info(
            "FLUX2_PUBLIC_URL not set: the URLs handed out name the address each connection arrived on (or its Host, "
            "if in FLUX2_ALLOWED_HOSTS); set it when clients reach this server under another address (a proxy, NAT)"
        )
    # API routes: keys, rate limits, the body limit (413 beyond: server/http/body_limit.py) and JSON bodies checked
    # for what JSON can't carry (NaN, lone surrogates: 422, server/http/json_body.py)
    for router in (edit.router, queue.router, storage.initiate_router):
        app.include_router(
            router,
            dependencies=[Depends(require_key), Depends(enforce_rate_limit), Depends(check_json_body)],
            responses=GUARDED,
            max_body_size=settings.max_body_bytes,
        )
    # OpenAI's images API: the same keys (as `Bearer`), limits and body limit; errors in OpenAI's shape
    app.include_router(
        openai.router,
        dependencies=[Depends(require_key), Depends(enforce_rate_limit), Depends(check_json_body)],
        responses=OPENAI_ERRORS,
        max_body_size=settings.max_body_bytes,
    )
    # the files themselves: their own limit, and no key (the one-time URL is the permission)
    app.include_router(
        storage.upload_router, max_body_size=settings.max_upload_bytes, responses={**TOO_LARGE, **LOW_ON_DISK}
    )
    app.add_middleware(fal_shaped_413)
    app.add_middleware(openai_compatible)  # /v1: Bearer keys, and every error (413 included) in OpenAI's shape
    app.add_middleware(queue_host_routing)
    app.add_middleware(fal_proxy, public_url=settings.public_url)  # a proxied request is rewritten before routing
    app.add_middleware(request_ids)
    if not settings.keys():  # an open API answers only under its own names (DNS rebinding: server/http/hosts.py)
        app.add_middleware(host_guard, names=HostNames(settings))
    app.add_middleware(server_timing)  # around all but CORS: the server's whole part of each response
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
    app.mount(openapi.DOCS_ASSETS, openapi.docs_assets, name="docs-assets")
    return app
