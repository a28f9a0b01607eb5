"""OpenAI's conventions on the OpenAI-compatible routes (/v1/...): `Authorization: Bearer <key>`, and errors in
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, which OpenAI's clients read.

One ASGI middleware does both for every /v1 request, whatever answers it (the route, the key check, the rate limit,
the body limit, validation, a 404): the Bearer header becomes fal's `Key` header (so keys, rate limits and who
owns a request work as on fal's routes), and an error answered in fal's shape (`{"detail": "message"}`, or
pydantic's list naming each field) is rewritten in OpenAI's. This is the one place OpenAI errors are made.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

PREFIX = "/v1/"

# fal's field names (as the routes' fal input names them) -> the OpenAI request's
OPENAI_FIELDS = {"image_urls": "image", "num_images": "n", "image_size": "size"}
# a code by status, for errors that name none of their own (a fal `{"detail": "message"}`)
CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
    507: "insufficient_storage",
}
BEARER_HINT = "Missing or invalid API key: send 'Authorization: Bearer <key>' (one of the server's API keys)"


class OpenAIErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, in plain words.")
    type: str = Field(description="'invalid_request_error' (4xx) or 'server_error' (5xx).")
    param: str | None = Field(None, description="The request field at fault, if one is.")
    code: str | None = Field(None, description="A machine-readable reason, e.g. 'model_not_found'.")


class OpenAIError(BaseModel):
    """OpenAI's error answer."""

    error: OpenAIErrorDetail


def _param(loc: list) -> str | None:
    """The OpenAI field a pydantic location names: ["body", "num_images"] -> "n"."""
    names = [str(part) for part in loc if part != "body" and not isinstance(part, int)]
    return OPENAI_FIELDS.get(names[0], names[0]) if names else None


def openai_error(status: int, detail: Any) -> tuple[int, dict]:
    """A fal-shaped error (`detail`: a message, or pydantic's list) as OpenAI's: (status, body). Invalid input is a
    400, as OpenAI answers it (fal's 422)."""
    param, code = None, CODES.get(status)
    if isinstance(detail, list) and detail:
        first = detail[0] if isinstance(detail[0], dict) else {}
        param, code = _param(list(first.get("loc", []))), str(first.get("type") or code)
        message = "; ".join(
            f"{_param(list(d.get('loc', []))) or 'body'}: {d.get('msg')}" if isinstance(d, dict) else str(d)
            for d in detail
        )
    else:
        message = BEARER_HINT if status == 401 else str(detail)
    if status == 422:
        status = 400
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _bearer_as_key(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`Authorization: Bearer <key>` (OpenAI's clients) as `Authorization: Key <key>` (fal's, which the key check,
    rate limits and request ownership read)."""
    out = []
    for name, value in headers:
        if name.lower() == b"authorization" and value[:7].lower() == b"bearer ":
            value = b"Key " + value[7:]
        out.append((name, value))
    return out


def openai_compatible(app):
    async def middleware(scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            return await app(scope, receive, send)
        scope = {**scope, "headers": _bearer_as_key(scope["headers"])}
        held: dict | None = None  # an error's start message, held until its body is read
        chunks: list[bytes] = []

        async def reshape(message):
            nonlocal held
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if message["status"] >= 400 and headers.get(b"content-type", b"").startswith(b"application/json"):
                    held = message
                    return
            elif held is not None and message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = b"".join(chunks)
                try:
                    data = json.loads(body)
                except ValueError:
                    data = None
                status = held["status"]
                if isinstance(data, dict) and "detail" in data and "error" not in data:
                    status, reshaped = openai_error(status, data["detail"])
                    body = json.dumps(reshaped).encode()
                kept = [(k, v) for k, v in held.get("headers", []) if k.lower() != b"content-length"]
                await send({**held, "status": status, "headers": [*kept, (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await app(scope, receive, reshape)

    return middleware


def _declared(description: str) -> dict:
    return {"model": OpenAIError, "description": description}


# Every error an OpenAI route can answer, for /openapi.json (OpenAI's shape; see server/http/responses.py for fal's)
OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _declared("Invalid input (a field out of range, an image that can't be used, an unsupported option)"),
    401: _declared("Missing or invalid API key; only when the server has API keys configured"),
    404: _declared("Unknown model (code model_not_found)"),
    413: _declared("The request body is larger than the server's limit (FLUX2_MAX_BODY_BYTES)"),
    429: _declared("Over this key's rate or concurrency limit; see the Retry-After header"),
    500: _declared("The model failed on this request"),
    503: _declared("This server can't run what was asked (a missing adapter or safety checker, no model)"),
    504: _declared("FLUX2_JOB_TIMEOUT_S passed while the request ran"),
    507: _declared("The data directory is below its free-space floor (FLUX2_MIN_FREE_DISK_BYTES)"),
}
