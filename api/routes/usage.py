"""/v1/usage: tokens and dollars of the jobs with a recorded cost, by model, key or day."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from api.auth import key_or_admin, presented_key
from api.deps import SessionDep, SettingsDep
from api.errors import ApiError
from promptq.periods import period_from
from promptq.reports import GroupBy, usage_report

router = APIRouter(prefix="/v1/usage", tags=["usage"])


@router.get(
    "",
    summary="Usage and cost, summed by model, key or day",
    description=(
        "One row per group over the jobs with a recorded cost (succeeded jobs on a priced "
        "model), counted by when they finished. `from` is inclusive and `to` exclusive; each "
        "is a date (`2026-11-01`, midnight UTC) or an ISO 8601 datetime (UTC when it has no "
        "offset). Without them: the current calendar month, UTC. `day` groups are UTC "
        "days. An API key sees its own usage; the admin token (`Authorization: Bearer "
        "$PROMPTQ_ADMIN_TOKEN`) sees every key's, optionally one key's with `key_id`."
    ),
    response_model=None,
)
def get_usage(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    from_: Annotated[
        str | None, Query(alias="from", description="inclusive: a date or ISO datetime")
    ] = None,
    to: Annotated[str | None, Query(description="exclusive: a date or ISO datetime")] = None,
    group_by: Annotated[GroupBy, Query(description="one row per model, key or UTC day")] = "model",
    key_id: Annotated[str | None, Query(description="admin token only: one key's usage")] = None,
    format: Annotated[Literal["json", "csv"], Query(description="csv: text/csv")] = "json",
) -> Response:
    key = key_or_admin(session, settings, presented_key(request))
    if key is not None:
        if key_id is not None and key_id != key.id:
            raise ApiError(
                403, "an API key sees only its own usage; the admin token sees every key's"
            )
        key_id = key.id
    report = usage_report(session, group_by, period_from(from_, to), key_id)
    if format == "csv":
        return Response(report.to_csv(), media_type="text/csv; charset=utf-8")
    return JSONResponse(report.to_api())
