"""The model: deterministic replies, usage and prompt caching."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets
import threading
from dataclasses import dataclass
from typing import Any

from promptq.simulator.config import CHARS_PER_TOKEN


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            texts = [b.get("text", "") for b in content if isinstance(b, dict)]
            return "\n".join(t for t in texts if isinstance(t, str) and t)
    return ""


@dataclass(frozen=True)
class Segment:
    """One piece of the prompt in cache order (tools, system, messages)."""

    chars: int
    key: str
    breakpoint: bool


def _block_segment(scope: str, block: dict[str, Any]) -> Segment:
    plain = {k: v for k, v in block.items() if k != "cache_control"}
    text = block.get("text")
    chars = len(text) if isinstance(text, str) else len(canonical(plain))
    return Segment(chars, f"{scope}:{canonical(plain)}", "cache_control" in block)


def prompt_segments(body: dict[str, Any]) -> list[Segment]:
    segments = [_block_segment("tool", t) for t in body.get("tools") or [] if isinstance(t, dict)]
    system = body.get("system")
    if isinstance(system, str):
        segments.append(Segment(len(system), f"system:{system}", False))
    elif isinstance(system, list):
        segments += [_block_segment("system", block) for block in system]
    for message in body["messages"]:
        role, content = message["role"], message["content"]
        if isinstance(content, str):
            segments.append(Segment(len(content), f"{role}:{canonical(content)}", False))
        else:
            segments += [_block_segment(role, block) for block in content]
    return segments


@dataclass(frozen=True)
class CacheUsage:
    read: int
    write: int
    keys: tuple[str, ...]  # what to remember once the call succeeds


class PromptCache:
    """Prefixes up to each cache_control breakpoint, by hash; the longest known one is read."""

    def __init__(self) -> None:
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def look_up(self, model: str, segments: list[Segment]) -> CacheUsage:
        digest = hashlib.sha256(model.encode())
        chars = 0
        prefixes: list[tuple[str, int]] = []
        for segment in segments:
            digest.update(b"\x00" + segment.key.encode())
            chars += segment.chars
            if segment.breakpoint:
                prefixes.append((digest.hexdigest(), tokens(chars)))
        if not prefixes:
            return CacheUsage(0, 0, ())
        with self._lock:
            read = max((n for key, n in prefixes if key in self._known), default=0)
        return CacheUsage(read, prefixes[-1][1] - read, tuple(key for key, _ in prefixes))

    def remember(self, usage: CacheUsage) -> None:
        with self._lock:
            self._known.update(usage.keys)

    def clear(self) -> None:
        with self._lock:
            self._known.clear()


_ADJECTIVES = ("quiet", "bright", "patient", "curious", "steady", "gentle", "brisk", "clever")
_NOUNS = ("answer", "thought", "note", "reply", "idea", "summary", "remark", "point")


def _reply_texts(body: dict[str, Any]) -> tuple[str, str]:
    """(thinking, text), both a pure function of the prompt."""
    digest = hashlib.sha256(
        canonical([body["model"], body.get("system"), body["messages"]]).encode()
    ).hexdigest()
    echo = " ".join(last_user_text(body["messages"]).split())[:80]
    adjective = _ADJECTIVES[int(digest[0:2], 16) % len(_ADJECTIVES)]
    noun = _NOUNS[int(digest[2:4], 16) % len(_NOUNS)]
    text = f'Simulated {adjective} {noun} {digest[:8]}. You said: "{echo}"'
    thinking = f'The user wrote "{echo[:40]}". A short {noun} will do ({digest[8:16]}).'
    return thinking, text


def _padded(text: str, tokens_wanted: int) -> str:
    """The reply stretched (or cut) to a given number of tokens, still a function of the
    prompt."""
    chars = tokens_wanted * CHARS_PER_TOKEN
    filler = " and so on"
    while len(text) < chars:
        text += filler
    return text[:chars]


def build_message(
    body: dict[str, Any], usage_in: tuple[int, CacheUsage], output_tokens: int | None = None
) -> dict[str, Any]:
    """The answer; `output_tokens` asks for a reply of that many tokens (capped by
    max_tokens), else its length follows the prompt."""
    input_tokens, cache = usage_in
    thinking, text = _reply_texts(body)
    if output_tokens is not None:
        text = _padded(text, max(1, output_tokens))
    if (body.get("thinking") or {}).get("type") != "enabled":
        thinking = ""
    stop_reason, stop_sequence = "end_turn", None
    hits = [(text.find(s), s) for s in body.get("stop_sequences") or [] if s and s in text]
    if hits:
        at, stop_sequence = min(hits)
        stop_reason, text = "stop_sequence", text[:at]
    budget = body["max_tokens"] * CHARS_PER_TOKEN
    if len(thinking) + len(text) > budget:
        stop_reason, stop_sequence = "max_tokens", None
        thinking = thinking[:budget]
        text = text[: budget - len(thinking)]
    content: list[dict[str, Any]] = []
    if thinking:
        signature = base64.b64encode(hashlib.sha512(thinking.encode()).digest()).decode()
        content.append({"type": "thinking", "thinking": thinking, "signature": signature})
    if text or not content:
        content.append({"type": "text", "text": text})
    written = min(body["max_tokens"], max(1, tokens(len(thinking) + len(text))))
    return {
        "id": "msg_" + secrets.token_hex(12),
        "type": "message",
        "role": "assistant",
        "content": content,
        "model": body["model"],
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": written,
            "cache_creation_input_tokens": cache.write,
            "cache_read_input_tokens": cache.read,
        },
    }
