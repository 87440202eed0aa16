"""Standard Webhooks signatures, checked by the standardwebhooks library's own verifier, by a
plain HMAC, and against the scheme's published example."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from promptq.keys.service import WEBHOOK_SECRET_PREFIX
from promptq.webhooks import sign

Tamper = Callable[[bytes, dict[str, str]], tuple[bytes, dict[str, str]]]
# Non-ASCII on purpose: the body is signed as UTF-8 text.
BODY = json.dumps(
    {"type": "job.succeeded", "data": {"id": "job_01", "output_text": "héllo"}}, ensure_ascii=False
)


def new_secret() -> str:
    # As promptq.keys.service makes them.
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def test_the_library_verifies_what_sign_produces() -> None:
    secret = new_secret()
    headers = sign(secret, "msg_1", datetime.now(UTC), BODY.encode())
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert headers["webhook-id"] == "msg_1"
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify(BODY.encode(), headers) == json.loads(BODY)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda body, headers: (body.replace(b"h\xc3\xa9llo", b"hello"), headers),
        lambda body, headers: (body + b" ", headers),
        lambda body, headers: (body, {**headers, "webhook-id": "msg_2"}),
        lambda body, headers: (
            body,
            {**headers, "webhook-timestamp": str(int(headers["webhook-timestamp"]) + 1)},
        ),
    ],
    ids=["body", "body-whitespace", "id", "timestamp"],
)
def test_a_tampered_webhook_fails_verification(tamper: Tamper) -> None:
    secret = new_secret()
    headers = sign(secret, "msg_1", datetime.now(UTC), BODY.encode())
    body, headers = tamper(BODY.encode(), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, headers)


def test_another_secret_fails_verification() -> None:
    headers = sign(new_secret(), "msg_1", datetime.now(UTC), BODY.encode())
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY.encode(), headers)


def test_the_signature_is_hmac_sha256_of_id_timestamp_body() -> None:
    key = secrets.token_bytes(24)
    secret = WEBHOOK_SECRET_PREFIX + base64.b64encode(key).decode()
    when = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    headers = sign(secret, "msg_x", when, BODY.encode())
    assert headers["webhook-timestamp"] == str(int(when.timestamp())) == "1767323045"
    expected = hmac.new(key, b"msg_x.1767323045." + BODY.encode(), hashlib.sha256).digest()
    assert headers["webhook-signature"] == "v1," + base64.b64encode(expected).decode()


def test_the_published_example() -> None:
    # The example of the Standard Webhooks specification.
    headers = sign(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        datetime.fromtimestamp(1614265330, UTC),
        b'{"test": 2432232314}',
    )
    assert headers == {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }


def test_a_time_in_another_zone_is_converted_not_relabelled() -> None:
    # The library alone would read 12:00+02:00 as 12:00 UTC, two hours off.
    secret = new_secret()
    now = datetime.now(UTC)
    local = now.astimezone(timezone(timedelta(hours=2)))
    headers = sign(secret, "msg_1", local, BODY.encode())
    assert headers == sign(secret, "msg_1", now, BODY.encode())
    assert headers["webhook-timestamp"] == str(int(now.timestamp()))
    Webhook(secret).verify(BODY.encode(), headers)


def test_a_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        sign(new_secret(), "msg_1", datetime.now(), BODY.encode())


@pytest.mark.parametrize("secret", ["whsec_", "whsec_!!!!", ""])
def test_an_unusable_secret_is_refused_without_being_echoed(secret: str) -> None:
    with pytest.raises(ValueError, match="not a whsec_ base64 secret") as caught:
        sign(secret, "msg_1", datetime.now(UTC), BODY.encode())
    assert caught.value.__suppress_context__


def test_an_empty_message_id_is_refused() -> None:
    with pytest.raises(ValueError, match="message id"):
        sign(new_secret(), "", datetime.now(UTC), BODY.encode())
