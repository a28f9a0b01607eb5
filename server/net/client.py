"""The one HTTP client for outbound calls (input image URLs, webhooks), shared by the API server and queue
workers, so its policy (timeouts, redirects, address checks) is set in one place: every connection goes through
the SSRF guard (server/net/guard.py), redirects are limited to `fetch_max_redirects`, and only the addresses
`fetch_allow` names may be private ones."""

from __future__ import annotations

import httpx

from server.config import Settings
from server.net.guard import AddressPolicy, guarded_client


def outbound_client(settings: Settings) -> httpx.AsyncClient:
    return guarded_client(
        AddressPolicy.parse(settings.fetch_allow), settings.fetch_timeout_s, settings.fetch_max_redirects
    )
