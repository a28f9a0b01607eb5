"""The FastAPI application: routers, error handlers, output files, and the model's lifetime."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from pipelines import load_editor
from server.config import Settings
from server.errors import install_error_handlers
from server.outputs import OutputStore
from server.routes import edit, health
from server.worker import InferenceWorker

log = logging.getLogger(__name__)


def create_app(settings: Settings, weights_dir: Path, tiny: bool = False) -> FastAPI:
    """An app serving the FLUX.2 weights in `weights_dir`; the model loads at start-up, before requests."""
    outputs = OutputStore(settings.data_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        editor = await asyncio.to_thread(load_editor, weights_dir, settings.device, settings.dtype)
        app.state.worker = InferenceWorker(editor)
        caps = editor.capabilities()
        for feature in ("safety_checker", "prompt_expansion"):
            if not caps[feature]:
                log.warning("%s is not available on this server: requests asking for it say so in 'notices'", feature)
        async with httpx.AsyncClient(follow_redirects=True, timeout=settings.fetch_timeout_s) as client:
            app.state.http = client
            yield
        app.state.worker.shutdown()

    app = FastAPI(
        title="flux2-server",
        summary="FLUX.2 [dev] image editing behind fal.ai's HTTP API, on your own GPU.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.outputs = outputs
    app.state.tiny = tiny
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(edit.router)
    app.mount("/files", StaticFiles(directory=outputs.files_dir), name="files")
    return app
