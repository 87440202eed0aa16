"""Outgoing webhooks: Standard Webhooks signatures, the refusal of private targets (SSRF) and
a sender that checks the address it connects to. Library code; the worker wires it in."""

from promptq.webhooks.sender import DeliveryResult, WebhookSender
from promptq.webhooks.signing import sign
from promptq.webhooks.ssrf import UnsafeTarget, check_url, is_unsafe_address

__all__ = [
    "DeliveryResult",
    "UnsafeTarget",
    "WebhookSender",
    "check_url",
    "is_unsafe_address",
    "sign",
]
