"""Request body limits: FastAPI's own `max_body_size` (per router, see app.py) refuses a body with 413 as soon as
its Content-Length, or the bytes streamed so far, pass the limit, before the rest is read. It answers in plain
text; this middleware only reshapes that answer into fal's error shape, `{"detail": message}`, naming the limit.
"""

from __future__ import annotations

import json

from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY


def fal_shaped_413(app):
    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        replaced = False

        async def reshape(message):
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] == 413:
                headers = dict(message.get("headers", []))
                if headers.get(b"content-type", b"").startswith(b"text/plain"):
                    replaced = True
                    limit = scope.get(MAX_BODY_SIZE_SCOPE_KEY)
                    detail = f"Request body larger than {limit} bytes" if limit is not None else "Request too large"
                    body = json.dumps({"detail": detail}).encode()
                    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                    await send({**message, "headers": start})
                    await send({"type": "http.response.body", "body": body})
                    return
            if replaced and message["type"] == "http.response.body":
                return  # the plain-text body, already replaced
            await send(message)

        await app(scope, receive, reshape)

    return middleware
