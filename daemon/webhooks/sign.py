"""The `Vigil-Signature` header: `t=<unix>,v1=<hex>`, where v1 is the HMAC-SHA256 of
`"<t>.<body>"` under the webhook's secret (the scheme Stripe and others use). The
timestamp is signed with the body, so a receiver can refuse replays of old ones."""

from __future__ import annotations

import hashlib
import hmac


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The header value for `body` sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"
