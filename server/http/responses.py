"""The error answers each route can give, declared once for /openapi.json.

Routers and routes spread these into their `responses=`, so the document lists every status a caller can get
(schemathesis checks that nothing undocumented comes back: tests/test_fuzz.py). The bodies are fal's error shape:
`{"detail": "message"}` here, and FastAPI's own `{"detail": [...]}` list for 422, which it declares itself.
"""

from typing import Any

from server.schemas import Message

Responses = dict[int | str, dict[str, Any]]  # FastAPI's `responses=`


def _message(description: str) -> dict:
    return {"model": Message, "description": description}


UNREADABLE_BODY: Responses = {400: _message("The body could not be read as JSON (FastAPI's 'error parsing the body')")}
NEEDS_KEY: Responses = {401: _message("Missing or invalid API key; only when the server has API keys configured")}
NOT_FOUND: Responses = {404: _message("Unknown or expired id")}
TOO_LARGE: Responses = {413: _message("The request body is larger than the server's limit (FLUX2_MAX_BODY_BYTES)")}
RATE_LIMITED: Responses = {429: _message("Over this key's rate or concurrency limit; see the Retry-After header")}
MODEL_FAILED: Responses = {
    500: _message("The model failed on this request (e.g. CUDA out of memory: error_type out_of_memory)")
}
UNAVAILABLE: Responses = {
    503: _message("This server can't run what was asked (a missing adapter or safety checker, no model)")
}
TIMED_OUT: Responses = {
    504: _message(
        "The request's own deadline passed: X-Fal-Request-Timeout before it started (header "
        "X-Fal-Request-Timeout-Type: user, as on fal), FLUX2_JOB_TIMEOUT_S or FLUX2_STEP_TIMEOUT_S while it ran, or "
        "(a sync call) FLUX2_SYNC_TIMEOUT_S"
    )
}

ALREADY_USED: Responses = {409: _message("This one-time upload URL was already used (finished by another call)")}
LOW_ON_DISK: Responses = {
    507: _message("The data directory is below its free-space floor (FLUX2_MIN_FREE_DISK_BYTES); try again later")
}

# Every route behind API keys, rate limits and the body limit (see server/http/app.py)
GUARDED: Responses = {**UNREADABLE_BODY, **NEEDS_KEY, **TOO_LARGE, **RATE_LIMITED, **LOW_ON_DISK}
