"""`Server-Timing` (W3C Server Timing) on every HTTP response: `app;dur=<ms>`, the time from the request's arrival
(its headers read) to the start of its response: what the server took, without the client's and the network's
part. Browsers' developer tools show it; benchmarks/gpu_busy.py splits a request's overhead with it."""

from __future__ import annotations

import time


def server_timing(app):
    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        arrived = time.perf_counter()

        async def send_timed(message):
            if message["type"] == "http.response.start":
                took_ms = (time.perf_counter() - arrived) * 1000
                headers = [*message.get("headers", []), (b"server-timing", f"app;dur={took_ms:.1f}".encode())]
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_timed)

    return middleware
