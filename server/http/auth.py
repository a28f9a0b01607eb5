"""API keys: `Authorization: Key <key>` on every API route when keys are configured (fal's header)."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from server.http.context import services

# Declares the header in /openapi.json (scheme "apiKeyAuth", as fal names it); the check itself is require_key's.
api_key_header = APIKeyHeader(
    name="Authorization",
    scheme_name="apiKeyAuth",
    description="'Key <key>' (fal's header); needed only when the server has API keys configured.",
    auto_error=False,
)


def has_valid_key(request: Request) -> bool:
    """Whether the request carries one of the configured keys (True when none are configured: the API is open)."""
    keys: list[str] = services(request).api_keys
    if not keys:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # compare against every key, always, so timing says nothing about which (or whether one) matched
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given.strip().encode(), key.encode())
    return scheme.lower() == "key" and matched


async def require_key(request: Request, _declared: str | None = Security(api_key_header)) -> None:
    """FastAPI dependency. With no keys configured the server is open (and said so at start-up)."""
    if not has_valid_key(request):
        raise HTTPException(
            401, "Missing or invalid API key: send 'Authorization: Key <key>'", headers={"WWW-Authenticate": "Key"}
        )
