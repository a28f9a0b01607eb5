"""Who a request counts against (`caller`), and the rate limit on every API route; the limits themselves are
server.service.quotas."""

from __future__ import annotations

from fastapi import Request

from server.http.auth import given_key, owner_id
from server.http.context import services


def caller(request: Request) -> str:
    """Who a request counts against: its API key (hashed) when keys are configured, else its client address."""
    if services(request).api_keys:
        return "key:" + owner_id(given_key(request))[:16]
    return "addr:" + (request.client.host if request.client else "unknown")


async def enforce_rate_limit(request: Request) -> None:
    """FastAPI dependency on every API route (after the key check, so only valid keys are counted)."""
    await services(request).quotas.hit(caller(request))
