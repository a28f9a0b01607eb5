"""fal's client-proxy convention, served by the server itself, so `fal.config({proxyUrl})` reaches it.

@fal-ai/client with a proxy sends every request to the proxy URL with `x-fal-target-url` naming the fal URL it
would have called. This ASGI middleware turns such a request into the local request it stands for, in place
(streams included): `https://fal.run/...` -> the sync routes, `https://queue.fal.run/...` -> /queue/...,
`https://rest.fal.ai/storage/upload/...` -> the local storage emulation, and a URL on this server (the URLs it
hands out, or a full-URL endpoint id) -> that path. Any other target is refused, as fal's own proxies do.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

PROXY_PATH = "/api/fal/proxy"
TARGET_HEADER = b"x-fal-target-url"


def local_path(target: str, own_host: str) -> tuple[str, str] | None:
    """(path, query) on this server for a proxied target URL, or None if it is not one this server serves."""
    url = urlsplit(target)
    if url.scheme not in ("http", "https"):
        return None
    host = url.netloc.lower()
    if host == "fal.run":
        return url.path, url.query
    if host == "queue.fal.run":
        return "/queue" + url.path, url.query
    if host == "rest.fal.ai" and url.path.startswith("/storage/upload/initiate"):
        return url.path, url.query
    if host == own_host.lower():
        return url.path, url.query
    return None


def fal_proxy(app):
    async def middleware(scope, receive, send):
        if scope["type"] != "http" or scope["path"] != PROXY_PATH:
            return await app(scope, receive, send)
        headers = dict(scope["headers"])
        target = headers.get(TARGET_HEADER, b"").decode("latin-1")
        mapped = local_path(target, headers.get(b"host", b"").decode("latin-1")) if target else None
        if mapped is None:
            problem = f"x-fal-target-url {target!r} is not served here" if target else "missing x-fal-target-url"
            body = json.dumps({"detail": problem}).encode()
            await send(
                {"type": "http.response.start", "status": 412, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": body})
            return
        path, query = mapped
        scope = {**scope, "path": path, "raw_path": path.encode(), "query_string": query.encode()}
        await app(scope, receive, send)

    return middleware
