"""Prompt templates: Jinja2 text rendered in Jinja2's sandbox with the JSON a webhook
source posts, so GitHub, a form or a Zap can start a job with its own payload."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from promptq import template_sandbox
from promptq.config import Settings
from promptq.errors import Conflict, NotFound
from promptq.ids import new_id
from promptq.jobspec.presenter import isoformat
from promptq.jobspec.schemas import JobCreate, ModelName
from promptq.models import ApiKey, PromptTemplate

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# Compiled and rendered in a child process with time, memory and output limits
# (promptq.template_sandbox); its error is this module's.
TemplateError = template_sandbox.TemplateError


class TemplateNotFound(NotFound, LookupError):
    pass


class TemplateExists(Conflict):
    pass


def _no_nul(text: str) -> str:
    # A template may hold any text but NUL, which PostgreSQL cannot store.
    if "\x00" in text:
        raise ValueError("holds a NUL character (U+0000), which a template cannot store")
    return text


class TemplateCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    # The size that matters is PROMPTQ_TEMPLATE_MAX_SOURCE_BYTES, checked by `create`.
    prompt: Annotated[str, AfterValidator(_no_nul)] = Field(min_length=1)
    system: Annotated[str, AfterValidator(_no_nul)] | None = None
    model: ModelName | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=1)
    webhook_url: str | None = Field(default=None, max_length=2048)


def limits(settings: Settings) -> template_sandbox.Limits:
    return template_sandbox.Limits(
        max_ms=settings.template_max_ms, max_bytes=settings.template_max_bytes
    )


def _sources(template: TemplateCreate | PromptTemplate) -> dict[str, str]:
    return {
        field: text
        for field in ("prompt", "system")
        if (text := getattr(template, field)) is not None
    }


def create(
    session: Session, settings: Settings, key: ApiKey, data: TemplateCreate
) -> PromptTemplate:
    if not NAME.match(data.name):
        raise TemplateError(
            "name: letters, digits, '.', '_' and '-' only, starting with a letter or digit"
        )
    sources = _sources(data)
    for field, text in sources.items():
        size = len(text.encode())
        if size > settings.template_max_source_bytes:
            raise TemplateError(
                f"{field}: {size} bytes; a template may have at most "
                f"{settings.template_max_source_bytes} (PROMPTQ_TEMPLATE_MAX_SOURCE_BYTES)"
            )
    template_sandbox.check(sources, limits(settings))
    template = PromptTemplate(id=new_id("tpl"), api_key_id=key.id, **data.model_dump())
    session.add(template)
    try:
        session.flush()
    except IntegrityError:
        # The key's names are unique in the database, so two requests racing for one name
        # are told the same as the one that comes second. The session is the caller's to
        # roll back, as after any error.
        raise TemplateExists(f"a template named {data.name!r} exists; delete it first") from None
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


def job_from(settings: Settings, template: PromptTemplate, payload: Any) -> JobCreate:
    """The job a posted payload makes: its top-level keys are the variables, and the whole
    of it is `input`. Blocks for up to PROMPTQ_TEMPLATE_MAX_MS: never call it on the event
    loop."""
    variables = dict(payload) if isinstance(payload, dict) else {}
    variables["input"] = payload
    try:
        fields: dict[str, Any] = dict(
            template_sandbox.render(_sources(template), variables, limits(settings))
        )
    except TemplateError as exc:
        raise TemplateError(f"template {template.name!r}: {exc}") from None
    return _with_settings_of(template, fields)


def _with_settings_of(template: PromptTemplate, fields: dict[str, Any]) -> JobCreate:
    for name in ("model", "max_tokens", "temperature", "webhook_url"):
        value = getattr(template, name)
        if value is not None:
            fields[name] = value
    return JobCreate.model_validate(fields)


def check_syntax(settings: Settings, text: str, field: str = "prompt") -> None:
    """TemplateError naming the line when `text` is not a template (the command line's check
    of an inline --prompt, in this process)."""
    template_sandbox.check_here({field: text}, limits(settings))


def job_from_here(
    settings: Settings, template: PromptTemplate, payload: Any, missing_hint: str
) -> JobCreate:
    """job_from, rendered in this process: for `promptq run` (template_sandbox.render_here)."""
    variables = dict(payload) if isinstance(payload, dict) else {}
    variables["input"] = payload
    try:
        fields: dict[str, Any] = dict(
            template_sandbox.render_here(
                _sources(template), variables, limits(settings), missing_hint
            )
        )
    except TemplateError as exc:
        raise TemplateError(f"template {template.name!r}: {exc}") from None
    return _with_settings_of(template, fields)


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
