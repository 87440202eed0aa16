"""What a client may send when it creates a job, validated at intake.

A job that can never succeed (no messages, max_tokens of zero, a thinking budget larger
than max_tokens, ...) is refused here with a message naming the field, rather than failing
minutes later at the upstream.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from promptq.jobspec.errors import InvalidJob
from promptq.models import Priority
from promptq.validation import NO_CONTROL_CHARACTERS

# Bounds on what one job may carry, each refused with a message naming it.
MAX_JSON_DEPTH = 64
MAX_METADATA_KEYS = 50
MAX_METADATA_BYTES = 16 * 1024
MAX_MESSAGES = 10_000

ModelName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, strip_whitespace=True),
    NO_CONTROL_CHARACTERS,
]
# Anthropic's documented minimum for extended thinking.
MIN_THINKING_BUDGET = 1024


class MessageParam(BaseModel):
    # Content blocks are passed through as given: the upstream knows their many shapes
    # (text, image, document, tool_use, tool_result, ...) better than a copy of them here.
    model_config = ConfigDict(extra="allow")

    role: Literal["user", "assistant"]
    content: Annotated[str, StringConstraints(min_length=1)] | list[dict[str, Any]]

    @model_validator(mode="after")
    def _content_not_empty(self) -> MessageParam:
        if isinstance(self.content, list) and not self.content:
            raise ValueError("content must be a non-empty string or a non-empty list of blocks")
        return self


class ThinkingParam(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["enabled", "disabled"]
    budget_tokens: int | None = Field(default=None, ge=MIN_THINKING_BUDGET)


class MessagesRequest(BaseModel):
    """Anthropic Messages parameters. Fields we don't know are passed through untouched, so
    new upstream parameters work without a promptq release."""

    model_config = ConfigDict(extra="allow")

    model: ModelName
    max_tokens: int = Field(ge=1, le=1_000_000)
    messages: list[MessageParam] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | list[dict[str, Any]] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stop_sequences: list[str] | None = None
    thinking: ThinkingParam | None = None
    stream: bool | None = None

    @model_validator(mode="after")
    def _consistent(self) -> MessagesRequest:
        if self.stream:
            raise ValueError(
                "stream: a queued job cannot stream; leave `stream` out (results come back "
                "by polling, ?wait=N or a webhook)"
            )
        if self.thinking and self.thinking.type == "enabled":
            budget = self.thinking.budget_tokens
            if budget is None:
                raise ValueError("thinking.budget_tokens is required when thinking is enabled")
            if budget >= self.max_tokens:
                raise ValueError(
                    f"thinking.budget_tokens ({budget}) must be less than max_tokens "
                    f"({self.max_tokens})"
                )
            if self.temperature not in (None, 1):
                raise ValueError("temperature: must be left out (or 1) when thinking is enabled")
        return self

    def to_upstream(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class JobCreate(BaseModel):
    """POST /v1/jobs: either `request` (full Messages params) or the flat `prompt` shorthand."""

    # Unknown top-level fields are refused: a typo such as `promt` must not silently become
    # a job without a prompt. Inside `request`, unknown fields pass through (see above).
    model_config = ConfigDict(extra="forbid")

    request: MessagesRequest | None = None
    prompt: Annotated[str, StringConstraints(min_length=1)] | None = None
    model: ModelName | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    system: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)

    webhook_url: Annotated[str, StringConstraints(max_length=2048)] | None = None
    callback_url: Annotated[str, StringConstraints(max_length=2048)] | None = None
    metadata: dict[str, Any] | None = None
    priority: Priority = Priority.NORMAL
    idempotency_key: (
        Annotated[str, StringConstraints(min_length=1, max_length=255), NO_CONTROL_CHARACTERS]
        | None
    ) = None

    @model_validator(mode="after")
    def _one_form(self) -> JobCreate:
        flat = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "system": self.system,
            "temperature": self.temperature,
        }
        if self.request is None and self.prompt is None:
            raise ValueError("give either `request` (Anthropic Messages params) or `prompt`")
        if self.request is not None:
            if self.prompt is not None:
                raise ValueError("give either `request` or `prompt`, not both")
            extra = sorted(name for name, value in flat.items() if value is not None)
            if extra:
                raise ValueError(
                    f"{', '.join(extra)}: flat fields go with `prompt`; put them inside "
                    "`request` instead"
                )
        if self.metadata is not None:
            if len(self.metadata) > MAX_METADATA_KEYS:
                raise ValueError(f"metadata: at most {MAX_METADATA_KEYS} keys")
            size = len(json.dumps(self.metadata, ensure_ascii=False).encode())
            if size > MAX_METADATA_BYTES:
                raise ValueError(
                    f"metadata: {size} bytes as JSON, more than the {MAX_METADATA_BYTES} allowed; "
                    "keep large data elsewhere and put its reference here"
                )
        if self.webhook_url and self.callback_url and self.webhook_url != self.callback_url:
            raise ValueError("webhook_url and callback_url are aliases; give one of them")
        for name in ("webhook_url", "callback_url"):
            url = getattr(self, name)
            if url is not None and not url.startswith(("http://", "https://")):
                raise ValueError(f"{name}: must be an http:// or https:// URL")
        return self

    @property
    def target_url(self) -> str | None:
        return self.webhook_url or self.callback_url

    def messages_request(self, default_model: str, default_max_tokens: int) -> MessagesRequest:
        if self.request is not None:
            return self.request
        params: dict[str, Any] = {
            "model": self.model or default_model,
            "max_tokens": self.max_tokens or default_max_tokens,
            "messages": [{"role": "user", "content": self.prompt}],
        }
        # An empty `system` (a Zapier row mapped from an empty field) means no system prompt,
        # not a blank one sent upstream.
        if self.system:
            params["system"] = self.system
        if self.temperature is not None:
            params["temperature"] = self.temperature
        return MessagesRequest.model_validate(params)


BETA_NAMES = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_BETA_HEADER = 500


def anthropic_beta(header: str | None) -> str | None:
    """The anthropic-beta header a client sent (comma-separated beta names), normalized;
    InvalidJob when it cannot be a list of beta names."""
    if header is None or not header.strip():
        return None
    names = [name.strip() for name in header.split(",") if name.strip()]
    if len(header) > MAX_BETA_HEADER or not all(BETA_NAMES.match(name) for name in names):
        raise InvalidJob(
            "anthropic-beta: a comma-separated list of beta names (letters, digits, `.`, `_`, "
            f"`-`), at most {MAX_BETA_HEADER} characters"
        )
    return ",".join(names)


def json_depth(value: Any) -> int:
    """How deeply a parsed JSON value nests (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            deepest = max(deepest, depth)
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest
