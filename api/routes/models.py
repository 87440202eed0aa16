"""GET /v1/models and GET /v1/models/{model_id}, in Anthropic's shape and paging, so that
tools with a model picker (n8n's Anthropic Chat Model, the SDKs' `models.list()`) work
with promptq as their base URL."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from api.deps import ApiKeyDep
from promptq import catalog

router = APIRouter(prefix="/v1/models", tags=["anthropic"])


def _catalog(request: Request) -> catalog.ModelCatalog:
    return request.app.state.catalog  # type: ignore[no-any-return]


@router.get("", summary="List the models this key may use, newest first")
def list_models(
    request: Request,
    key: ApiKeyDep,
    limit: Annotated[int, Query(ge=1, le=catalog.MAX_LIMIT)] = catalog.DEFAULT_LIMIT,
    after_id: Annotated[str | None, Query(description="the page after this model")] = None,
    before_id: Annotated[str | None, Query(description="the page before this model")] = None,
) -> dict[str, Any]:
    models = catalog.allowed_models(key, _catalog(request).models())
    return catalog.page_of(models, limit, after_id, before_id).to_api()


@router.get("/{model_id}", summary="Get a model")
def get_model(model_id: str, request: Request, key: ApiKeyDep) -> dict[str, str]:
    models = catalog.allowed_models(key, _catalog(request).models())
    return catalog.find(models, model_id).to_api()
