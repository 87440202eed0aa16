"""What a call will cost the token buckets, guessed before it is made.

The guess only has to be close: the limiter corrects each bucket by the true figures from
the answer's usage. It errs high, because an underestimate is what earns a 429.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

CHARS_PER_TOKEN = 3.5
# Anthropic bills an image by its size, about 1,600 tokens for a typical one; without
# decoding the image this is the honest guess.
TOKENS_PER_IMAGE = 1600
# A base64 PDF: roughly 1,500 to 3,000 tokens per page and tens of KB per page.
BASE64_CHARS_PER_DOCUMENT_TOKEN = 30
TOKENS_PER_MESSAGE = 4


def estimate_input_tokens(request: Mapping[str, Any]) -> int:
    tokens = _text_tokens(request.get("system"))
    for message in request.get("messages") or []:
        tokens += TOKENS_PER_MESSAGE + _content_tokens(message.get("content"))
    if request.get("tools"):
        tokens += _chars(json.dumps(request["tools"], ensure_ascii=False))
    return max(1, tokens)


def output_reservation(request: Mapping[str, Any]) -> int:
    """max_tokens already includes any thinking budget."""
    return int(request.get("max_tokens") or 0)


def _chars(text: str) -> int:
    return int(len(text) / CHARS_PER_TOKEN) + 1


def _text_tokens(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return _chars(value)
    return _content_tokens(value)


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return _chars(content)
    if not isinstance(content, list):
        return _chars(json.dumps(content, ensure_ascii=False, default=str))
    total = 0
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "image":
            total += TOKENS_PER_IMAGE
        elif kind == "document":
            source = block.get("source") or {}
            data = source.get("data")
            if isinstance(data, str) and source.get("type") == "base64":
                total += len(data) // BASE64_CHARS_PER_DOCUMENT_TOKEN + 1
            else:
                total += _chars(json.dumps(source, ensure_ascii=False, default=str))
        elif isinstance(block.get("text"), str):
            total += _chars(block["text"])
        else:
            total += _chars(json.dumps(block, ensure_ascii=False, default=str))
    return total
