"""REST-hook subscriptions, as Zapier's platform expects them: a URL and the events it
wants, for every job of the key that made it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from promptq.ids import new_id
from promptq.jobs.presenter import isoformat
from promptq.models import ApiKey, WebhookSubscription
from promptq.types import utcnow
from promptq.webhooks.ssrf import UnsafeTarget, check_url

EVENTS = ("job.succeeded", "job.failed", "batch.ended")


class SubscriptionError(ValueError):
    """A subscription that cannot be made; the message says why."""


class SubscriptionNotFound(LookupError):
    pass


def subscribe(
    session: Session, key: ApiKey, url: Any, events: Any, allow_private: bool
) -> WebhookSubscription:
    if not isinstance(url, str) or not url:
        raise SubscriptionError("url: give the http(s) URL that should receive the events")
    try:
        check_url(url, allow_private=allow_private)
    except UnsafeTarget as exc:
        raise SubscriptionError(str(exc).replace("webhook_url", "url", 1)) from None
    if events is None:
        events = list(EVENTS[:2])
    if (
        not isinstance(events, list)
        or not events
        or not all(isinstance(e, str) and e in EVENTS for e in events)
    ):
        raise SubscriptionError(f"events: a non-empty list of {', '.join(EVENTS)}")
    subscription = WebhookSubscription(
        id=new_id("whk"), api_key_id=key.id, url=url, events=sorted(set(events))
    )
    session.add(subscription)
    session.flush()
    return subscription


def of_key(session: Session, key: ApiKey) -> Sequence[WebhookSubscription]:
    query = (
        select(WebhookSubscription)
        .where(WebhookSubscription.api_key_id == key.id)
        .order_by(WebhookSubscription.created_at.desc())
    )
    return session.scalars(query).all()


def get(session: Session, key: ApiKey, subscription_id: str) -> WebhookSubscription:
    found = session.get(WebhookSubscription, subscription_id)
    if found is None or found.api_key_id != key.id:
        raise SubscriptionNotFound(f"no webhook {subscription_id!r} for this API key")
    return found


def unsubscribe(session: Session, key: ApiKey, subscription_id: str) -> None:
    session.delete(get(session, key, subscription_id))
    session.flush()


def listening(session: Session, api_key_id: str, event_type: str) -> list[WebhookSubscription]:
    query = select(WebhookSubscription).where(
        WebhookSubscription.api_key_id == api_key_id,
        WebhookSubscription.disabled_at.is_(None),
    )
    return [s for s in session.scalars(query) if event_type in s.events]


def disable(session: Session, subscription_id: str, reason: str) -> None:
    subscription = session.get(WebhookSubscription, subscription_id)
    if subscription is not None and subscription.disabled_at is None:
        subscription.disabled_at = utcnow()
        subscription.disabled_reason = reason


def to_api(subscription: WebhookSubscription) -> dict[str, Any]:
    return {
        "id": subscription.id,
        "object": "webhook",
        "url": subscription.url,
        "events": subscription.events,
        "created_at": isoformat(subscription.created_at),
        "disabled_at": isoformat(subscription.disabled_at),
        "disabled_reason": subscription.disabled_reason,
    }
