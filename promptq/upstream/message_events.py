"""A finished message as the server-sent events of Anthropic's streaming Messages API.

promptq runs every request as a queued job and calls the upstream without streaming (a
retry or a rate-limit wait in the middle of a stream cannot be hidden from the client),
so `stream: true` is answered once the job has finished, with the same events a stream
of that message would have carried: one delta per content block instead of many. What
the SDKs build from them (`get_final_message()`, `text_stream`) is the same message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

# Blocks whose content streams as deltas, and how: the empty block that opens each one,
# then the deltas that fill it in.
_TEXT = "text"
_THINKING = "thinking"
_TOOL_USES = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})


def sse(event: str, data: dict[str, Any]) -> bytes:
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event}\ndata: {payload}\n\n".encode()


def message_events(message: dict[str, Any]) -> Iterator[bytes]:
    usage = dict(message.get("usage") or {})
    start_usage = {**usage, "output_tokens": min(1, int(usage.get("output_tokens") or 0))}
    opening = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    yield sse("message_start", {"type": "message_start", "message": opening})
    for index, block in enumerate(message.get("content") or []):
        yield from _block_events(index, block)
    yield sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {
                "stop_reason": message.get("stop_reason"),
                "stop_sequence": message.get("stop_sequence"),
            },
            "usage": usage,
        },
    )
    yield sse("message_stop", {"type": "message_stop"})


def _block_events(index: int, block: dict[str, Any]) -> Iterator[bytes]:
    kind = block.get("type")
    deltas: list[dict[str, Any]] = []
    if kind == _TEXT:
        opening = {**block, "text": ""}
        deltas.append({"type": "text_delta", "text": block.get("text", "")})
    elif kind == _THINKING:
        opening = {**block, "thinking": "", "signature": ""}
        deltas.append({"type": "thinking_delta", "thinking": block.get("thinking", "")})
        if block.get("signature"):
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
    elif kind in _TOOL_USES:
        opening = {**block, "input": {}}
        partial = json.dumps(block.get("input") or {}, separators=(",", ":"))
        deltas.append({"type": "input_json_delta", "partial_json": partial})
    else:
        # Blocks that never stream in parts (redacted thinking, tool results): whole.
        opening = block
    yield sse(
        "content_block_start",
        {"type": "content_block_start", "index": index, "content_block": opening},
    )
    for delta in deltas:
        yield sse(
            "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        )
    yield sse("content_block_stop", {"type": "content_block_stop", "index": index})
