"""Prompt templates: Jinja2 text rendered in Jinja2's sandbox with the JSON a webhook
source posts, so GitHub, a form or a Zap can start a job with its own payload."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from promptq.ids import new_id
from promptq.jobs.presenter import isoformat
from promptq.jobs.schemas import JobCreate
from promptq.models import ApiKey, PromptTemplate

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# The sandbox refuses attribute access that leads to Python internals; StrictUndefined
# makes a missing variable an error rather than an empty string in the prompt.
_ENVIRONMENT = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


class TemplateError(ValueError):
    """A template, or the payload given to it, that cannot make a prompt."""


class TemplateNotFound(LookupError):
    pass


class TemplateCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    prompt: str = Field(min_length=1, max_length=200_000)
    system: str | None = Field(default=None, max_length=200_000)
    model: str | None = Field(default=None, min_length=1, max_length=200)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=1)
    webhook_url: str | None = Field(default=None, max_length=2048)


def create(session: Session, key: ApiKey, data: TemplateCreate) -> PromptTemplate:
    if not NAME.match(data.name):
        raise TemplateError(
            "name: letters, digits, '.', '_' and '-' only, starting with a letter or digit"
        )
    for field in ("prompt", "system"):
        text = getattr(data, field)
        if text is not None:
            check_syntax(text, field)
    template = PromptTemplate(id=new_id("tpl"), api_key_id=key.id, **data.model_dump())
    session.add(template)
    session.flush()
    return template


def get(session: Session, key: ApiKey, name: str) -> PromptTemplate:
    query = select(PromptTemplate).where(
        PromptTemplate.api_key_id == key.id, PromptTemplate.name == name
    )
    template = session.scalars(query).first()
    if template is None:
        raise TemplateNotFound(f"no template named {name!r} for this API key")
    return template


def of_key(session: Session, key: ApiKey) -> Sequence[PromptTemplate]:
    query = select(PromptTemplate).where(PromptTemplate.api_key_id == key.id)
    return session.scalars(query.order_by(PromptTemplate.name)).all()


def delete(session: Session, key: ApiKey, name: str) -> None:
    session.delete(get(session, key, name))
    session.flush()


def check_syntax(text: str, field: str = "prompt") -> None:
    """TemplateError naming the line when `text` is not a template."""
    try:
        _ENVIRONMENT.from_string(text)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"{field}: line {exc.lineno}: {exc.message}") from None


def job_from(
    template: PromptTemplate, payload: Any, missing_hint: str = "post JSON that has it"
) -> JobCreate:
    """The job a posted payload makes: its top-level keys are the variables, and the whole
    of it is `input`. `missing_hint` says what to do about a missing variable."""
    variables = dict(payload) if isinstance(payload, dict) else {}
    variables["input"] = payload
    fields: dict[str, Any] = {"prompt": _render(template, "prompt", variables, missing_hint)}
    if template.system is not None:
        fields["system"] = _render(template, "system", variables, missing_hint)
    for name in ("model", "max_tokens", "temperature", "webhook_url"):
        value = getattr(template, name)
        if value is not None:
            fields[name] = value
    return JobCreate.model_validate(fields)


def _render(
    template: PromptTemplate, field: str, variables: dict[str, Any], missing_hint: str
) -> str:
    try:
        return _ENVIRONMENT.from_string(getattr(template, field)).render(variables)
    except UndefinedError as exc:
        raise TemplateError(
            f"template {template.name!r} ({field}): {exc.message}; {missing_hint}"
        ) from None
    except SecurityError as exc:
        raise TemplateError(f"template {template.name!r} ({field}): refused: {exc}") from None


def to_api(template: PromptTemplate) -> dict[str, Any]:
    return {
        "id": template.id,
        "object": "template",
        "name": template.name,
        "prompt": template.prompt,
        "system": template.system,
        "model": template.model,
        "max_tokens": template.max_tokens,
        "temperature": template.temperature,
        "webhook_url": template.webhook_url,
        "created_at": isoformat(template.created_at),
    }
