"""fal's webhook signatures: every delivery is signed with Ed25519, and the public key is published as a JWKS.

As fal documents for its own webhooks, a delivery carries `X-Fal-Webhook-Request-Id`, `X-Fal-Webhook-User-Id`,
`X-Fal-Webhook-Timestamp` (Unix seconds) and `X-Fal-Webhook-Signature` (hex): the Ed25519 signature of those three
values and the SHA-256 hex digest of the body, joined by newlines. Receivers check it against the keys at
`GET /.well-known/jwks.json`, so fal's own verification code works when pointed at this server's JWKS URL.

The private key lives in the data dir (`webhook-signing-key.pem`, created on first start, mode 0600). Processes that
share a data dir share the key; in a scale-out, give every machine the same file (see README), or receivers see
deliveries signed by a key the JWKS they read does not list.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

KEY_FILE = "webhook-signing-key.pem"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class WebhookSigner:
    def __init__(self, key: Ed25519PrivateKey, user_id: str):
        self.key = key
        self.user_id = user_id
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_key = raw
        self.key_id = hashlib.sha256(raw).hexdigest()[:16]

    @classmethod
    def load_or_create(cls, data_dir: Path, user_id: str) -> WebhookSigner:
        """The key in `data_dir`, made there (readable by this user only) if there is none yet."""
        path = data_dir / KEY_FILE
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            try:  # O_EXCL: of two processes starting at once, one writes the key and both read it
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "wb") as file:
                    file.write(pem)
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise TypeError(f"{path} is not an Ed25519 private key")
        return cls(key, user_id)

    def headers(self, request_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """fal's four webhook headers for a delivery of `body` about `request_id`, signed now."""
        timestamp = int(time.time()) if timestamp is None else timestamp
        message = "\n".join([request_id, self.user_id, str(timestamp), hashlib.sha256(body).hexdigest()])
        return {
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": self.user_id,
            "X-Fal-Webhook-Timestamp": str(timestamp),
            "X-Fal-Webhook-Signature": self.key.sign(message.encode()).hex(),
        }

    def jwks(self) -> dict:
        """The public key as a JSON Web Key Set (RFC 7517; an OKP key, RFC 8037), as fal publishes its keys."""
        key = {"kty": "OKP", "crv": "Ed25519", "x": _b64url(self.public_key), "kid": self.key_id}
        return {"keys": [{**key, "use": "sig", "alg": "EdDSA"}]}
