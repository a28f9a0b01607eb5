"""fal's client-proxy convention, served by the server itself, so `fal.config({proxyUrl})` reaches it.

@fal-ai/client with a proxy sends every request to the proxy URL with `x-fal-target-url` naming the fal URL it
would have called. This ASGI middleware turns such a request into the local request it stands for, in place
(streams included): `https://fal.run/...` -> the sync routes, `https://queue.fal.run/...` -> /queue/...,
`https://rest.fal.ai/storage/upload/...` -> the local storage emulation, and a URL on this server (the URLs it
hands out, or a full-URL endpoint id) -> that path. Any other target is refused, as fal's own proxies do.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from urllib.parse import urlsplit

from server.http.hosts import arrival_netloc

PROXY_PATH = "/api/fal/proxy"
TARGET_HEADER = b"x-fal-target-url"


def local_path(target: str, own_hosts: Collection[str]) -> tuple[str, str] | None:
    """(path, query) on this server for a proxied target URL, or None if it is not one this server serves.
    `own_hosts`: this server's `host[:port]` names (the URLs it hands out name one of them)."""
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
    if host in {own.lower() for own in own_hosts}:
        return url.path, url.query
    return None


def fal_proxy(app, public_url: str | None = None):
    async def middleware(scope, receive, send):
        if scope["type"] != "http" or scope["path"] != PROXY_PATH:
            return await app(scope, receive, send)
        headers = dict(scope["headers"])
        target = headers.get(TARGET_HEADER, b"").decode("latin-1")
        # the names its URLs may carry (server/http/hosts.py): the Host, FLUX2_PUBLIC_URL's, the address it arrived on
        own = [headers.get(b"host", b"").decode("latin-1"), urlsplit(public_url or "").netloc]
        own += [arrival_netloc(scope, scheme) or "" for scheme in ("http", "https")]
        mapped = local_path(target, [name for name in own if name]) if target else None
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
