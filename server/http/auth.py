"""API keys: `Authorization: Key <key>` on every API route when keys are configured (fal's header), and who may see
a request: with keys, a request belongs to the key that submitted it. Its status (stream and logs included),
result and cancel answer only to that key, or to an operator key (FLUX2_OPERATOR_KEYS), which sees every
request; to any other key it is unknown (404, as fal answers). The queue keeps the SHA-256 of the submitting key
(`owner_id`), never the key. Without keys (an open API) nothing is owned."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from server.http.context import services
from server.queue.backend import QueuedRequest

# Declares the header in /openapi.json (scheme "apiKeyAuth", as fal names it); the check itself is require_key's.
api_key_header = APIKeyHeader(
    name="Authorization",
    scheme_name="apiKeyAuth",
    description="'Key <key>' (fal's header); needed only when the server has API keys configured.",
    auto_error=False,
)


def given_key(request: Request) -> str:
    """The key in the request's `Authorization: Key <key>` header ('' if none)."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "key" else ""


def has_valid_key(request: Request) -> bool:
    """Whether the request carries one of the configured keys (True when none are configured: the API is open)."""
    keys: list[str] = services(request).api_keys
    if not keys:
        return True
    given = given_key(request).encode()
    # compare against every key, always, so timing says nothing about which (or whether one) matched
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    return bool(given) and matched


async def require_key(request: Request, _declared: str | None = Security(api_key_header)) -> None:
    """FastAPI dependency. With no keys configured the server is open (and said so at start-up)."""
    if not has_valid_key(request):
        raise HTTPException(
            401, "Missing or invalid API key: send 'Authorization: Key <key>'", headers={"WWW-Authenticate": "Key"}
        )


def owner_id(key: str) -> str:
    """What the queue keeps of the key that submitted a request: its SHA-256, hex (the key can't be read back)."""
    return hashlib.sha256(key.encode()).hexdigest()


def owner_of(request: Request) -> str | None:
    """The owner of a request this caller submits: its key's `owner_id`; None on an open API."""
    return owner_id(given_key(request)) if services(request).api_keys else None


def may_see(request: Request, queued: QueuedRequest) -> bool:
    """Whether this caller may see (and cancel) `queued`: its own key submitted it, or it holds an operator key.
    Open to all on an open API, and for a request without owner (queued while the API was open, or by a version
    that recorded none)."""
    if not services(request).api_keys or queued.owner is None:
        return True
    caller = owner_id(given_key(request))
    operators = [owner_id(key) for key in services(request).operator_keys]
    return any(hmac.compare_digest(caller, owner) for owner in [queued.owner, *operators])
