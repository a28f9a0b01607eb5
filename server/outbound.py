"""The one HTTP client for outbound calls (input image URLs, webhooks), shared by the API server and queue
workers, so its policy (timeouts, redirects, address checks) is set in one place."""

from __future__ import annotations

import httpx

from server.config import Settings


def outbound_client(settings: Settings) -> httpx.AsyncClient:
    return httpx.AsyncClient(follow_redirects=True, timeout=settings.fetch_timeout_s)
