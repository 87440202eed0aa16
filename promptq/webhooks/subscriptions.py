"""REST-hook subscriptions, as Zapier's platform expects them: a URL and the events it
wants, for every job of the key that made it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from promptq.clock import utcnow
from promptq.errors import InvalidRequest, NotFound
from promptq.ids import new_id
from promptq.jobspec.presenter import isoformat
from promptq.models import ApiKey, WebhookSubscription
from promptq.webhooks.sender import DeliveryResult
from promptq.webhooks.ssrf import NO_ALLOW, UnsafeTarget, WebhookAllow, check_url

EVENTS = ("job.succeeded", "job.failed", "batch.ended")


class SubscriptionError(InvalidRequest, ValueError):
    """A subscription that cannot be made; the message says why."""


class SubscriptionNotFound(NotFound, LookupError):
    pass


def subscribe(
    session: Session,
    key: ApiKey,
    url: Any,
    events: Any,
    allow_private: bool,
    allow: WebhookAllow = NO_ALLOW,
) -> WebhookSubscription:
    if not isinstance(url, str) or not url:
        raise SubscriptionError("url: give the http(s) URL that should receive the events")
    try:
        check_url(url, allow_private=allow_private, allow=allow)
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


# A subscription whose receiver has failed every attempt for this long is disabled: long
# enough to ride out a weekend's outage, short enough not to knock on a dead door forever.
DISABLE_AFTER_FAILING = timedelta(days=3)
GONE = 410


def note_attempt(
    session: Session, subscription_id: str, result: DeliveryResult, now: datetime
) -> bool:
    """Track a subscription's health from one delivery attempt; False when it is (now)
    disabled: its receiver answered 410 Gone, or has failed every attempt for days."""
    subscription = session.get(WebhookSubscription, subscription_id)
    if subscription is None or subscription.disabled_at is not None:
        return False
    if result.succeeded:
        subscription.failing_since = None
        return True
    outcome = f"{result.status_code}" if result.status_code else str(result.error)
    if result.status_code == GONE:
        disable(session, subscription_id, "the receiver answered 410 Gone")
        return False
    if subscription.failing_since is None:
        subscription.failing_since = now
        return True
    if now - subscription.failing_since >= DISABLE_AFTER_FAILING:
        disable(
            session,
            subscription_id,
            f"every delivery since {isoformat(subscription.failing_since)} failed, the last "
            f"with {outcome}; fix the receiver, then subscribe again",
        )
        return False
    return True


def disable(session: Session, subscription_id: str, reason: str) -> None:
    subscription = session.get(WebhookSubscription, subscription_id)
    if subscription is not None and subscription.disabled_at is None:
        subscription.disabled_at = utcnow()
        subscription.disabled_reason = reason


def disable_all_of_key(session: Session, api_key_id: str, reason: str) -> int:
    statement = (
        update(WebhookSubscription)
        .where(
            WebhookSubscription.api_key_id == api_key_id,
            WebhookSubscription.disabled_at.is_(None),
        )
        .values(disabled_at=utcnow(), disabled_reason=reason)
        .execution_options(synchronize_session=False)
    )
    return session.execute(statement).rowcount  # type: ignore[attr-defined]


def to_api(subscription: WebhookSubscription) -> dict[str, Any]:
    return {
        "id": subscription.id,
        "object": "webhook",
        "url": subscription.url,
        "events": subscription.events,
        "created_at": isoformat(subscription.created_at),
        "failing_since": isoformat(subscription.failing_since),
        "disabled_at": isoformat(subscription.disabled_at),
        "disabled_reason": subscription.disabled_reason,
    }
