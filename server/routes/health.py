"""Liveness and what this server can do."""

from fastapi import APIRouter, Request

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(request: Request) -> dict:
    state = request.app.state
    return {
        "status": "ok",
        "tiny_model": state.tiny,
        "waiting": state.worker.waiting,  # edits submitted to the model and not finished, the running one included
        "queued": state.store.queued_count(),  # queue requests not started yet
        "capabilities": state.worker.editor.capabilities(),
    }
