"""Standard Webhooks signatures: the three headers that let a receiver check that a webhook
came from promptq, unaltered, and recently (https://www.standardwebhooks.com)."""

from __future__ import annotations

import binascii
import math
from datetime import UTC, datetime

from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook


def sign(secret: str, message_id: str, timestamp: datetime, body: bytes) -> dict[str, str]:
    """`webhook-id`, `webhook-timestamp` (unix seconds) and `webhook-signature` (`v1,` + base64
    HMAC-SHA256 of `id.timestamp.body` under the `whsec_` secret)."""
    if not message_id:
        raise ValueError("a webhook needs a non-empty message id")
    if timestamp.tzinfo is None:
        # A naive time could be local or UTC; a guess shifts the signed time by hours.
        raise ValueError("the webhook timestamp must be timezone-aware")
    # The library replaces the time zone instead of converting: give it UTC already.
    utc = timestamp.astimezone(UTC)
    try:
        signer = Webhook(secret)
    except (binascii.Error, EmptyWebhookSecretError):
        raise ValueError("the webhook secret is not a whsec_ base64 secret") from None
    # The scheme signs text; promptq's bodies are JSON, which is UTF-8.
    signature = signer.sign(msg_id=message_id, timestamp=utc, data=body.decode("utf-8"))
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(math.floor(utc.timestamp())),
        "webhook-signature": signature,
    }
