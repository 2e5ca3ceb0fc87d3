"""Standard Webhooks signing: the key of LAKESYNC_WEBHOOK_SECRET and a delivery's signature.

Standard library only: ``config`` checks the secret at load with it, and ``notify`` signs."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac


def signing_key(secret: str) -> bytes:
    """The HMAC key of LAKESYNC_WEBHOOK_SECRET: `whsec_` + base64 decoded, else the text's
    UTF-8 bytes; ValueError for a `whsec_` secret that is not base64."""
    if not secret.startswith("whsec_"):
        return secret.encode()
    encoded = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        raise ValueError(
            "a secret starting with whsec_ must go on with base64 (e.g. "
            "`whsec_$(openssl rand -base64 32)`); or give any other text, used as it is"
        )
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: `v1,` + base64 of HMAC-SHA256 over id.timestamp.body."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()
