"""What a call will cost the token buckets, guessed before it is made.

The guess only has to be close: the limiter corrects each bucket by the true figures from
the answer's usage. It errs high, because an underestimate is what earns a 429.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 3.5
# Anthropic bills an image by its size, about 1,600 tokens for a typical one; without
# decoding the image this is the honest guess.
TOKENS_PER_IMAGE = 1600
# A base64 PDF: roughly 1,500 to 3,000 tokens per page and tens of KB per page.
BASE64_CHARS_PER_DOCUMENT_TOKEN = 30
TOKENS_PER_MESSAGE = 4
# How long the upstream keeps a cached prefix: five minutes, or an hour when asked for.
CACHE_TTL_SECONDS = {"5m": 300, "1h": 3600}


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


@dataclass(frozen=True)
class CachePrefix:
    """The prompt up to one `cache_control` breakpoint: what the upstream caches."""

    digest: str  # of everything up to and including the breakpoint's block, in cache order
    tokens: int  # estimated, as estimate_input_tokens counts them
    ttl_seconds: int


def cache_prefixes(request: Mapping[str, Any]) -> list[CachePrefix]:
    """The prompt's cacheable prefixes, shortest first, in the upstream's cache order (tools,
    system, messages). A prefix is identified by a digest of its blocks, so two prompts that
    share it name the same cache entry."""
    digest = hashlib.sha256(str(request.get("model", "")).encode())
    tokens = 0
    prefixes: list[CachePrefix] = []
    for block, block_tokens in _blocks_in_cache_order(request):
        plain = {k: v for k, v in block.items() if k != "cache_control"}
        digest.update(b"\x00" + json.dumps(plain, sort_keys=True, default=str).encode())
        tokens += block_tokens
        control = block.get("cache_control")
        if isinstance(control, dict):
            ttl = CACHE_TTL_SECONDS.get(str(control.get("ttl", "5m")), 300)
            prefixes.append(CachePrefix(digest.hexdigest(), tokens, ttl))
    return prefixes


def _blocks_in_cache_order(request: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any], int]]:
    """Every block that can carry a breakpoint, with its estimated tokens; plain strings
    (which cannot) count as blocks too, so that what comes after them is told apart."""
    for tool in request.get("tools") or []:
        if isinstance(tool, dict):
            yield tool, _chars(json.dumps(tool, ensure_ascii=False, default=str))
    system = request.get("system")
    if isinstance(system, str):
        yield {"type": "text", "text": system}, _chars(system)
    elif isinstance(system, list):
        yield from ((b, _content_tokens([b])) for b in system if isinstance(b, dict))
    for message in request.get("messages") or []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        role = {"role": message.get("role")}
        if isinstance(content, str):
            yield {**role, "text": content}, TOKENS_PER_MESSAGE + _chars(content)
        elif isinstance(content, list):
            yield role, TOKENS_PER_MESSAGE
            yield from ((b, _content_tokens([b])) for b in content if isinstance(b, dict))
