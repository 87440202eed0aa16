"""/v1/templates: prompt templates, and jobs made from whatever JSON a webhook source posts."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api.bodies import parse_json_body
from api.deps import ApiKeyDep, SessionDep, SettingsDep
from api.intake import FORM_TYPES, take_in
from promptq import quotas, templates

router = APIRouter(prefix="/v1/templates", tags=["templates"])


@router.post("", status_code=201, summary="Create a prompt template")
def create_template(
    body: templates.TemplateCreate, session: SessionDep, settings: SettingsDep, key: ApiKeyDep
) -> JSONResponse:
    quotas.check_templates(session, settings, key)
    template = templates.create(session, settings, key, body)
    session.commit()
    return JSONResponse(templates.to_api(template), status_code=201)


@router.get("", summary="List prompt templates")
def list_templates(session: SessionDep, key: ApiKeyDep) -> dict[str, Any]:
    return {"data": [templates.to_api(t) for t in templates.of_key(session, key)]}


@router.get("/{name}", summary="Get a prompt template")
def get_template(name: str, session: SessionDep, key: ApiKeyDep) -> dict[str, Any]:
    return templates.to_api(templates.get(session, key, name))


@router.delete("/{name}", summary="Delete a prompt template")
def delete_template(name: str, session: SessionDep, key: ApiKeyDep) -> dict[str, Any]:
    templates.delete(session, key, name)
    session.commit()
    return {"name": name, "object": "template", "deleted": True}


@router.post("/{name}/jobs", status_code=202, summary="Start a job from a template")
async def template_job(
    name: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    key: ApiKeyDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    """Whatever JSON is posted becomes the template's variables: its top-level keys, and
    the whole of it as `input`."""
    payload = await _payload(request)
    template = await run_in_threadpool(templates.get, session, key, name)
    # In the thread pool: a render blocks for up to PROMPTQ_TEMPLATE_MAX_MS.
    job = await run_in_threadpool(templates.job_from, settings, template, payload)
    body = await take_in(request, settings, key, job, idempotency_key)
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{body['id']}"})


async def _payload(request: Request) -> Any:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in FORM_TYPES:
        form = await request.form()
        return {k: v for k, v in form.items() if isinstance(v, str)}
    raw = await request.body()
    return parse_json_body(raw) if raw.strip() else {}
