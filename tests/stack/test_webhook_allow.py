"""PROMPTQ_WEBHOOK_ALLOW and PROMPTQ_WEBHOOK_ALLOW_PRIVATE as the API applies them at
intake (the checks themselves are test_webhook_ssrf.py's)."""

from __future__ import annotations

from typing import Any

import pytest


def test_the_api_honours_the_allow_list(settings: Any, api_key: str) -> None:
    """PROMPTQ_WEBHOOK_ALLOW from the settings reaches intake: subscriptions and jobs."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    configured = settings.model_copy(
        update={"webhook_allow_private": False, "webhook_allow": "127.0.0.1,n8n.local"}
    )
    headers = {"Authorization": f"Bearer {api_key}"}
    with TestClient(create_app(configured)) as client:
        for url in ("http://127.0.0.1:5678/hook", "http://n8n.local/hook"):
            response = client.post("/v1/webhooks", json={"url": url}, headers=headers)
            assert response.status_code == 201, response.text
        refused = client.post("/v1/webhooks", json={"url": "http://127.0.0.2/"}, headers=headers)
        assert refused.status_code == 422
        assert "PROMPTQ_WEBHOOK_ALLOW" in refused.json()["error"]["message"]
        job = client.post(
            "/v1/jobs",
            json={"prompt": "x", "webhook_url": "http://169.254.169.254/"},
            headers=headers,
        )
        assert job.status_code == 422 and "metadata" in job.json()["error"]["message"]


def test_a_bad_allow_setting_is_refused_at_start() -> None:
    from pydantic import ValidationError

    from promptq.config import Settings

    with pytest.raises(ValidationError, match="neither"):
        Settings(webhook_allow="10.0.0.0/8,not a host!")
