"""/v1/webhooks: REST-hook subscriptions (Zapier's "subscribe" and "unsubscribe")."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api.deps import ApiKeyDep, SessionDep, SettingsDep
from promptq import quotas
from promptq.webhooks import subscriptions

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


class SubscriptionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2048)
    # Default: job.succeeded and job.failed.
    events: list[str] | None = None


@router.post("", status_code=201, summary="Subscribe a URL to job events")
def subscribe(
    body: SubscriptionCreate, session: SessionDep, settings: SettingsDep, key: ApiKeyDep
) -> JSONResponse:
    quotas.check_subscriptions(session, settings, key)
    subscription = subscriptions.subscribe(
        session,
        key,
        body.url,
        body.events,
        allow_private=settings.webhook_allow_private,
        allow=settings.webhook_allow_list,
    )
    session.commit()
    return JSONResponse(subscriptions.to_api(subscription), status_code=201)


@router.get("", summary="List subscriptions")
def list_subscriptions(session: SessionDep, key: ApiKeyDep) -> dict[str, Any]:
    return {"data": [subscriptions.to_api(s) for s in subscriptions.of_key(session, key)]}


@router.get("/{subscription_id}", summary="Get a subscription")
def get_subscription(subscription_id: str, session: SessionDep, key: ApiKeyDep) -> dict[str, Any]:
    return subscriptions.to_api(subscriptions.get(session, key, subscription_id))


@router.delete("/{subscription_id}", summary="Unsubscribe")
def unsubscribe(subscription_id: str, session: SessionDep, key: ApiKeyDep) -> dict[str, Any]:
    subscriptions.unsubscribe(session, key, subscription_id)
    session.commit()
    return {"id": subscription_id, "object": "webhook", "deleted": True}
