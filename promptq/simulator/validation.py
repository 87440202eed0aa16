"""Validation, the way Anthropic answers."""

from __future__ import annotations

from typing import Any, TypeGuard

from promptq.simulator.answers import ApiError

_TOP_LEVEL_FIELDS = frozenset(
    {
        "model",
        "max_tokens",
        "messages",
        "system",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "stream",
        "metadata",
        "tools",
        "tool_choice",
        "thinking",
        "service_tier",
        "container",
        "mcp_servers",
        "context_management",
    }
)


# POST /v1/messages/count_tokens takes the prompt's parameters, none of the sampling ones.
_COUNT_TOKENS_FIELDS = frozenset(
    {
        "model",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "thinking",
        "mcp_servers",
        "context_management",
    }
)


def _invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_blocks(where: str, blocks: list[Any]) -> None:
    for j, block in enumerate(blocks):
        if not isinstance(block, dict):
            raise _invalid(f"{where}.{j}: Input should be a valid dictionary")
        if not isinstance(block.get("type"), str):
            raise _invalid(f"{where}.{j}.type: Field required")
        if block["type"] == "text":
            if not isinstance(block.get("text"), str):
                raise _invalid(f"{where}.{j}.text: Field required")
            if not block["text"]:
                raise _invalid(f"{where}: text content blocks must be non-empty")


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise _invalid("messages: Field required")
    if not isinstance(messages, list):
        raise _invalid("messages: Input should be a valid list")
    if not messages:
        raise _invalid("messages: at least one message is required")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"messages.{i}: Input should be a valid dictionary")
        if message.get("role") not in ("user", "assistant"):
            raise _invalid(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        content = message.get("content")
        final_assistant = i == len(messages) - 1 and message["role"] == "assistant"
        if isinstance(content, str):
            if not content and not final_assistant:
                raise _invalid(
                    f"messages.{i}: all messages must have non-empty content except for "
                    "the optional final assistant message"
                )
        elif isinstance(content, list):
            _check_blocks(f"messages.{i}.content", content)
        else:
            raise _invalid(
                f"messages.{i}.content: Input should be a valid string or a list of content blocks"
            )


def _check_thinking(body: dict[str, Any], counting: bool = False) -> None:
    thinking = body.get("thinking")
    if thinking is None:
        return
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled"):
        raise _invalid("thinking.type: Input should be 'enabled' or 'disabled'")
    if thinking["type"] != "enabled":
        return
    budget = thinking.get("budget_tokens")
    if not _is_int(budget):
        raise _invalid("thinking.enabled.budget_tokens: Field required")
    if budget < 1024:
        raise _invalid(
            "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
        )
    if not counting and budget >= body["max_tokens"]:
        raise _invalid("`max_tokens` must be greater than `thinking.budget_tokens`.")
    if "temperature" in body and body["temperature"] != 1:
        raise _invalid("`temperature` may only be set to 1 when thinking is enabled.")


def _check_max_tokens(body: dict[str, Any]) -> None:
    if "max_tokens" not in body:
        raise _invalid("max_tokens: Field required")
    if not _is_int(body["max_tokens"]):
        raise _invalid("max_tokens: Input should be a valid integer")
    if body["max_tokens"] < 1:
        raise _invalid("max_tokens: Input should be greater than or equal to 1")


def validate_request(body: Any, *, counting: bool = False) -> dict[str, Any]:
    """A Messages request, or with `counting` a count_tokens one (no max_tokens)."""
    if not isinstance(body, dict):
        raise _invalid("request body: Input should be a valid dictionary")
    extra = sorted(set(body) - (_COUNT_TOKENS_FIELDS if counting else _TOP_LEVEL_FIELDS))
    if extra:
        raise _invalid(f"{extra[0]}: Extra inputs are not permitted")
    if "model" not in body:
        raise _invalid("model: Field required")
    if not isinstance(body["model"], str):
        raise _invalid("model: Input should be a valid string")
    if not counting:
        _check_max_tokens(body)
    _check_messages(body.get("messages"))
    system = body.get("system")
    if system is not None:
        if isinstance(system, list):
            _check_blocks("system", system)
        elif not isinstance(system, str):
            raise _invalid("system: Input should be a valid string or a list of text blocks")
    if "temperature" in body:
        temperature = body["temperature"]
        if not _is_number(temperature):
            raise _invalid("temperature: Input should be a valid number")
        if not 0 <= temperature <= 1:
            raise _invalid("temperature: Input should be between 0 and 1")
    stops = body.get("stop_sequences")
    if stops is not None and not (
        isinstance(stops, list) and all(isinstance(s, str) for s in stops)
    ):
        raise _invalid("stop_sequences: Input should be a valid list of strings")
    if body.get("stream"):
        raise _invalid("stream: the simulator answers whole messages only, not streams")
    _check_thinking(body, counting)
    if not body["model"].startswith("claude-"):
        raise ApiError(404, "not_found_error", f"model: {body['model']}")
    return body
