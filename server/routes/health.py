"""Liveness and what this server can do."""

from fastapi import APIRouter, Request

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(request: Request) -> dict:
    state = request.app.state
    local = state.worker  # None on an API front-end, whose requests run on `flux2-server worker` processes
    return {
        "status": "ok",
        "tiny_model": state.tiny,
        # edits submitted to this process's model and not finished, the running one included
        "waiting": local.waiting if local else None,
        "queued": state.store.queued_count(),  # queue requests not started yet (all workers' queue)
        "workers": state.store.workers(),  # live workers, each as it advertises itself (heartbeat not expired)
        "capabilities": local.editor.capabilities() if local else None,
        "allow_undistilled": state.settings.allow_undistilled,  # distilled profiles may run on base weights
        "safety_checker_disabled": state.settings.disable_safety_checker,  # turned off by the operator
    }
