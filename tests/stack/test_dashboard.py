"""/dashboard: the sign-in flow, what a key and the admin token each see, the chart data
against /v1/usage, HTML escaping, and (in headless Chromium, when it is installed) that the
charts really draw."""

from __future__ import annotations

import importlib.util
import json
import re
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import auth
from money_helpers import add_job, key_id_of
from pydantic import SecretStr

from promptq.clock import utcnow
from promptq.db import session_scope
from promptq.models import Job
from promptq.testing import HAIKU, SONNET

ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
ISLAND = re.compile(r'<script type="application/json" id="dashboard-data">(.*?)</script>', re.S)


@pytest.fixture
def admin_client(settings: Any) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from api.app import create_app

    configured = settings.model_copy(update={"admin_token": SecretStr(ADMIN_TOKEN)})
    with TestClient(create_app(configured)) as test_client:
        yield test_client


def page(client: Any, credential: str) -> str:
    response = client.get("/dashboard", headers=auth(credential))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    return str(response.text)


def island(html: str) -> dict[str, Any]:
    match = ISLAND.search(html)
    assert match, "no chart data in the page"
    return json.loads(match.group(1))  # type: ignore[no-any-return]


def add_failure(database_url: str, key_id: str, message: str, model: str = SONNET) -> str:
    job_id = add_job(database_url, key_id, utcnow(), status="failed", model=model)
    with session_scope(database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.error_type, job.error_message, job.upstream_status = (
            "invalid_request_error",
            message,
            400,
        )
    return job_id


@pytest.fixture
def local_client(settings: Any) -> Iterator[Any]:
    """A browser on the API's own machine, over plain http to loopback: the one case whose
    cookie is not Secure. Its address's failed sign-ins start from none."""
    import redis
    from fastapi.testclient import TestClient

    from api.app import create_app
    from promptq.redis_keys import DASHBOARD_FAILED_SIGN_INS_PREFIX

    redis.Redis.from_url(settings.redis_url).delete(DASHBOARD_FAILED_SIGN_INS_PREFIX + "127.0.0.1")
    with TestClient(
        create_app(settings), base_url="http://127.0.0.1:8000", client=("127.0.0.1", 50000)
    ) as test_client:
        yield test_client


def test_sign_in_sets_a_strict_httponly_cookie_and_never_echoes_the_credential(
    local_client: Any, api_key: str
) -> None:
    client = local_client
    form = client.get("/dashboard")
    assert form.status_code == 200
    assert 'action="/dashboard/sign-in"' in form.text and 'name="credential"' in form.text
    assert "set-cookie" not in form.headers

    for wrong in ("pq_not-a-real-key", "hunter2", ""):
        refused = client.post("/dashboard/sign-in", data={"credential": wrong})
        assert refused.status_code == 401, refused.text
        assert "not a valid API key or admin token" in refused.text
        assert 'name="credential"' in refused.text
        assert "set-cookie" not in refused.headers
        if wrong:
            assert wrong not in refused.text

    signed_in = client.post(
        "/dashboard/sign-in", data={"credential": api_key}, follow_redirects=False
    )
    assert signed_in.status_code == 303
    assert signed_in.headers["location"] == "/dashboard"
    cookie = signed_in.headers["set-cookie"]
    assert cookie.startswith("promptq_dashboard=")
    for attribute in ("HttpOnly", "SameSite=strict", "Path=/dashboard"):
        assert attribute in cookie
    assert "Secure" not in cookie  # plain http to loopback; see the cases below

    board = client.get("/dashboard")  # the cookie alone
    assert board.status_code == 200
    assert "Sign out" in board.text and "dashboard-data" in board.text
    assert api_key not in board.text
    assert board.headers["cache-control"] == "no-store"
    assert "script-src 'self'" in board.headers["content-security-policy"]

    signed_out = client.post("/dashboard/sign-out", follow_redirects=False)
    assert signed_out.status_code == 303
    assert 'promptq_dashboard=""' in signed_out.headers["set-cookie"]
    assert "Max-Age=0" in signed_out.headers["set-cookie"]
    assert 'name="credential"' in client.get("/dashboard").text

    # A cookie that holds no live session: the form, 401, and the cookie goes.
    client.cookies.set("promptq_dashboard", "garbage!", path="/dashboard")
    stale = client.get("/dashboard")
    assert stale.status_code == 401 and 'name="credential"' in stale.text
    assert "Max-Age=0" in stale.headers["set-cookie"]


def session_cookie(client: Any, credential: str, **headers: str) -> str:
    signed_in = client.post(
        "/dashboard/sign-in",
        data={"credential": credential},
        headers=headers,
        follow_redirects=False,
    )
    assert signed_in.status_code == 303, signed_in.text
    return str(signed_in.cookies["promptq_dashboard"])


def test_the_cookie_is_a_random_session_id_not_the_credential(
    local_client: Any, api_key: str
) -> None:
    import base64

    first = session_cookie(local_client, api_key)
    second = session_cookie(local_client, api_key)
    assert first != second and len(first) >= 40
    for cookie in (first, second):
        assert api_key not in cookie
        assert api_key.encode() not in base64.urlsafe_b64decode(cookie + "=" * (-len(cookie) % 4))


def test_signing_out_ends_the_session_for_every_copy_of_the_cookie(
    local_client: Any, api_key: str
) -> None:
    cookie = session_cookie(local_client, api_key)
    assert local_client.get("/dashboard").status_code == 200
    assert local_client.post("/dashboard/sign-out", follow_redirects=False).status_code == 303
    # A copy taken before signing out (another tab, a stolen cookie) is worth nothing.
    local_client.cookies.set("promptq_dashboard", cookie, path="/dashboard")
    again = local_client.get("/dashboard")
    assert again.status_code == 401 and 'name="credential"' in again.text


def test_a_revoked_keys_session_ends(
    local_client: Any, api_key: str, database_url: str, settings: Any
) -> None:
    from promptq.jobs.revocation import revoke

    session_cookie(local_client, api_key)
    assert local_client.get("/dashboard").status_code == 200
    with session_scope(database_url) as session:
        revoke(session, settings, key_id_of(database_url, api_key))
    assert local_client.get("/dashboard").status_code == 401


def test_the_cookie_is_secure_over_https(settings: Any, api_key: str) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(settings), base_url="https://testserver") as client:
        response = client.post(
            "/dashboard/sign-in", data={"credential": api_key}, follow_redirects=False
        )
    assert response.status_code == 303
    assert "Secure" in response.headers["set-cookie"]


@pytest.mark.parametrize(
    ("base_url", "peer", "trusted", "headers", "secure"),
    [
        # Plain http to another host: a proxy's or a LAN's; the cookie must not travel bare.
        ("http://promptq.example.com", "203.0.113.9", "", {}, True),
        ("http://testserver", "127.0.0.1", "", {}, True),
        # A TLS proxy on this machine that rewrote Host to loopback but says it forwarded.
        ("http://127.0.0.1:8000", "127.0.0.1", "", {"X-Forwarded-Proto": "https"}, True),
        ("http://127.0.0.1:8000", "127.0.0.1", "", {"X-Forwarded-For": "203.0.113.9"}, True),
        # A configured proxy is believed, both ways.
        ("http://127.0.0.1:8000", "10.0.0.2", "10.0.0.0/24", {"X-Forwarded-Proto": "https"}, True),
        ("http://127.0.0.1:8000", "127.0.0.1", "127.0.0.1", {"X-Forwarded-Proto": "http"}, False),
        # The one plain case: a browser on this machine.
        ("http://localhost:8000", "127.0.0.1", "", {}, False),
        ("http://[::1]:8000", "::1", "", {}, False),
    ],
)
def test_the_cookie_is_secure_unless_plain_http_on_loopback(
    settings: Any,
    api_key: str,
    base_url: str,
    peer: str,
    trusted: str,
    headers: dict[str, str],
    secure: bool,
) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    configured = settings.model_copy(update={"trusted_proxies": trusted})
    with TestClient(create_app(configured), base_url=base_url, client=(peer, 50000)) as client:
        response = client.post(
            "/dashboard/sign-in",
            data={"credential": api_key},
            headers=headers,
            follow_redirects=False,
        )
    assert response.status_code == 303, response.text
    assert ("Secure" in response.headers["set-cookie"]) == secure


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:8000"},
    ],
)
def test_sign_in_and_sign_out_refuse_cross_site_posts(
    local_client: Any, api_key: str, headers: dict[str, str]
) -> None:
    refused = local_client.post("/dashboard/sign-in", data={"credential": api_key}, headers=headers)
    assert refused.status_code == 403 and "another site" in refused.text
    assert "set-cookie" not in refused.headers
    session_cookie(
        local_client, api_key, Origin="http://127.0.0.1:8000", **{"Sec-Fetch-Site": "same-origin"}
    )
    out = local_client.post("/dashboard/sign-out", headers=headers, follow_redirects=False)
    assert out.status_code == 403
    assert local_client.get("/dashboard").status_code == 200  # still signed in


def test_failed_sign_ins_are_limited_per_address(settings: Any, api_key: str) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    configured = settings.model_copy(update={"dashboard_max_failed_sign_ins": 3})
    address = f"198.51.100.{uuid.uuid4().int % 250 + 1}"
    with TestClient(create_app(configured), client=(address, 1)) as client:
        import redis

        from promptq.redis_keys import DASHBOARD_FAILED_SIGN_INS_PREFIX

        redis.Redis.from_url(settings.redis_url).delete(DASHBOARD_FAILED_SIGN_INS_PREFIX + address)
        for _ in range(3):
            wrong = client.post("/dashboard/sign-in", data={"credential": "pq_guess"})
            assert wrong.status_code == 401
        blocked = client.post("/dashboard/sign-in", data={"credential": api_key})
        assert blocked.status_code == 429 and "set-cookie" not in blocked.headers
        assert 0 < int(blocked.headers["retry-after"]) <= 900
    with TestClient(create_app(configured), client=("198.51.100.251", 1)) as other:
        # Another address is not held back by this one's failures.
        assert session_cookie(other, api_key)


def test_headers_work_as_for_the_api(admin_client: Any, api_key: str) -> None:
    assert "dashboard-data" in page(admin_client, api_key)
    by_x_api_key = admin_client.get("/dashboard", headers={"x-api-key": api_key})
    assert by_x_api_key.status_code == 200 and "dashboard-data" in by_x_api_key.text
    assert "all keys" in page(admin_client, ADMIN_TOKEN)
    wrong = admin_client.get("/dashboard", headers=auth(ADMIN_TOKEN + "x"))
    assert wrong.status_code == 401 and 'name="credential"' in wrong.text
    # The page is not part of the JSON API's OpenAPI document.
    assert not any(
        path.startswith("/dashboard") for path in admin_client.get("/openapi.json").json()["paths"]
    )


def test_a_key_sees_its_own_jobs_and_the_admin_token_everyones(
    admin_client: Any, make_key: Any, database_url: str
) -> None:
    alice, bob = make_key("alice"), make_key("bob")
    a, b = key_id_of(database_url, alice), key_id_of(database_url, bob)
    alice_failure = add_failure(database_url, a, f"alice's failure {uuid.uuid4().hex}")
    bob_failure = add_failure(database_url, b, f"bob's failure {uuid.uuid4().hex}")
    add_job(database_url, a, utcnow(), cost=("0.001", "0.002", "0", "0"))
    add_job(database_url, a, utcnow(), cost=("0.001", "0.002", "0", "0"))
    add_job(database_url, a, None, status="queued")

    mine = page(admin_client, alice)
    assert alice_failure in mine and "alice&#39;s failure" in mine
    assert bob_failure not in mine and "bob&#39;s failure" not in mine
    assert island(mine)["statuses"] == [
        {"status": "queued", "jobs": 1},
        {"status": "running", "jobs": 0},
        {"status": "retrying", "jobs": 0},
        {"status": "succeeded", "jobs": 2},
        {"status": "failed", "jobs": 1},
        {"status": "canceled", "jobs": 0},
    ]
    assert island(mine)["scope"] == a

    everyone = page(admin_client, ADMIN_TOKEN)
    assert alice_failure in everyone and bob_failure in everyone
    # The admin's table names each failure's key; the two just added are the newest.
    rows = re.findall(
        r"<code>(job_\w+)</code></td>\s*<td[^>]*>[^<]*</td>\s*<td>(\w+)</td>", everyone
    )
    assert rows[:2] == [(bob_failure, "bob"), (alice_failure, "alice")]
    assert island(everyone)["scope"] == "all keys"
    counts = {row["status"]: row["jobs"] for row in island(everyone)["statuses"]}
    assert counts["failed"] >= 2 and counts["succeeded"] >= 2 and counts["queued"] >= 1


def test_the_chart_data_is_the_usage_report(
    admin_client: Any, make_key: Any, database_url: str
) -> None:
    plain = make_key("charts")
    key = key_id_of(database_url, plain)
    now = utcnow()
    for finished, model, cost in [
        (now, SONNET, ("0.000300000001", "0.0015", "0.00001875", "0")),
        (now, HAIKU, ("0.000011", "0.000065", "0", "0")),
        (now - timedelta(days=3), SONNET, ("0.25", "1.5", "0", "0")),
        (now - timedelta(days=29), HAIKU, ("0.1", "0", "0", "0")),
        (now - timedelta(days=45), SONNET, ("7", "0", "0", "0")),  # before both periods
    ]:
        add_job(database_url, key, finished, model=model, cost=cost)
    data = island(page(admin_client, plain))

    by_model = admin_client.get("/v1/usage", headers=auth(plain)).json()
    models = data["spend_by_model"]
    assert (models["from"], models["to"]) == (by_model["from"], by_model["to"])
    assert models["models"] == [
        {"model": row["model"], "jobs": row["jobs"], "cost": row["cost"]["total"]}
        for row in by_model["data"]
    ]
    assert models["cost"] == by_model["total"]["cost"]["total"]
    assert all(isinstance(row["cost"], str) for row in models["models"])

    days = data["spend_by_day"]
    assert len(days["days"]) == 30
    assert days["days"][-1]["day"] == now.date().isoformat()
    assert days["to"] == (now + timedelta(days=1)).date().isoformat() + "T00:00:00Z"
    by_day = admin_client.get(
        "/v1/usage",
        params={"group_by": "day", "from": days["from"], "to": days["to"]},
        headers=auth(plain),
    ).json()
    reported = {row["day"]: (row["jobs"], row["cost"]["total"]) for row in by_day["data"]}
    assert len(reported) == 3  # today, three days ago, 29 days ago
    assert {d["day"]: (d["jobs"], d["cost"]) for d in days["days"] if d["jobs"]} == reported
    assert all(d["cost"] == "0" for d in days["days"] if d["day"] not in reported)
    assert days["cost"] == by_day["total"]["cost"]["total"]
    assert reported[now.date().isoformat()] == (2, "0.001894750001")


def test_errors_and_model_names_are_escaped(client: Any, make_key: Any, database_url: str) -> None:
    plain = make_key("escaping")
    key = key_id_of(database_url, plain)
    evil_model = "</script><script>alert('model')</script>"
    add_failure(
        database_url, key, '<script>alert("error")</script> & <b>bold</b>', model=evil_model
    )
    add_job(database_url, key, utcnow(), model=evil_model, cost=("0.1", "0", "0", "0"))
    html = page(client, plain)
    assert '<script>alert("error")</script>' not in html
    assert (
        "&lt;script&gt;alert(&#34;error&#34;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in html
    )
    assert "<script>alert(" not in html
    # Only the page's own three script elements: the data island and two scripts.
    assert html.count("<script") == 3
    # The data island parses back to the very name, though it cannot end its element.
    assert island(html)["spend_by_model"]["models"][0]["model"] == evil_model


def test_the_last_day_per_hour_and_the_limiter_per_model(
    client: Any, database_url: str, make_key: Any, redis_url: str
) -> None:
    import redis

    from promptq.ratelimit.limiter import RedisLimiter

    key = make_key("hours")
    key_id = key_id_of(database_url, key)
    model = f"claude-sonnet-4-5-hours-{uuid.uuid4().hex[:6]}"
    now = utcnow()
    for took, status in ((2, "succeeded"), (4, "succeeded"), (30, "failed")):
        job_id = add_job(database_url, key_id, now, status=status, model=model)
        with session_scope(database_url) as session:
            job = session.get(Job, job_id)
            assert job is not None
            job.created_at = now - timedelta(seconds=took)
    # Three hours ago, and two days ago (outside the day shown).
    add_job(database_url, key_id, now - timedelta(hours=3), model=model)
    add_job(database_url, key_id, now - timedelta(days=2), model=model)
    # A job of this model waiting in the rate limiter's queue (every waiting job has its
    # cost noted there).
    costs = RedisLimiter.keys(model)[3]
    redis.Redis.from_url(redis_url).hset(costs, "job_waiting_for_the_test", "1:1:1:key_x")

    data = island(page(client, key))
    hours = data["hours"]
    assert len(hours) == 24
    assert hours[-1]["hour"] == now.strftime("%Y-%m-%dT%H:00:00Z")
    assert (hours[-1]["succeeded"], hours[-1]["failed"]) == (2, 1)
    assert (hours[-1]["p50_seconds"], hours[-1]["p95_seconds"]) == (4.0, 30.0)
    assert hours[-4]["succeeded"] == 1
    assert sum(h["succeeded"] + h["failed"] for h in hours) == 4
    assert hours[0]["p50_seconds"] is None
    [state] = [row for row in data["limiter"] if row["model"] == model]
    assert state == {"model": model, "in_flight": 0, "waiting": 1, "paused_seconds": 0}
    html = page(client, key)
    assert 'id="chart-hours"' in html and 'id="chart-latency"' in html
    assert f"<td>{model}</td><td>0</td><td>1</td><td>no</td>" in html


# --- In a real browser -------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists())
    or importlib.util.find_spec("selenium") is None,
    reason="headless Chromium test: needs /usr/bin/chromium and /usr/bin/chromedriver "
    "(apt-get install chromium chromium-driver) and selenium (make install)",
)
COUNT_COLOR = """
const [canvas, r, g, b] = arguments;
const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
let count = 0;
for (let i = 0; i < pixels.length; i += 4) {
  const [pr, pg, pb, alpha] = pixels.subarray(i, i + 4);
  if (pr === r && pg === g && pb === b && alpha === 255) count++;
}
return count;
"""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def run_jobs(api_url: str, key: str, jobs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    ids = []
    for model, prompt in jobs:
        response = requests.post(
            f"{api_url}/v1/jobs",
            json={"prompt": f"{prompt} {uuid.uuid4().hex}", "model": model},
            headers=auth(key),
            timeout=10,
        )
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    finished = []
    deadline = time.monotonic() + 30
    for job_id in ids:
        while True:
            job = requests.get(f"{api_url}/v1/jobs/{job_id}", headers=auth(key), timeout=10).json()
            if job["status"] in {"succeeded", "failed", "canceled"}:
                finished.append(job)
                break
            assert time.monotonic() < deadline, f"job {job_id} never finished: {job}"
            time.sleep(0.1)
    return finished


@needs_chromium
def test_the_charts_draw_in_headless_chromium(browser: Any, api_server: str, make_key: Any) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    key = make_key("browser")
    jobs = run_jobs(
        api_server,
        key,
        [
            (SONNET, "dashboard job one"),
            (SONNET, "dashboard job two"),
            # Two seconds slower than the others, so that the hour's 95th percentile (the
            # slowest of four) stands well above its median on the latency chart. Four
            # quick jobs submitted together and picked up late by a busy worker end
            # together, their times within a pixel, and the amber dot hides the blue one.
            (HAIKU, "dashboard job three [[sim:latency=2]]"),
            (SONNET, "[[sim:400]] dashboard job that fails"),
        ],
    )
    assert [job["status"] for job in jobs] == ["succeeded"] * 3 + ["failed"]
    failed = jobs[-1]

    # Signed in the way a person does: the form, then the cookie it sets.
    browser.get(f"{api_server}/dashboard")
    browser.find_element(By.NAME, "credential").send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(browser, 20).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "[id^=chart-][data-rendered]")) == 5
    )
    assert browser.current_url == f"{api_server}/dashboard"

    days = browser.find_element(By.ID, "chart-days")
    models = browser.find_element(By.ID, "chart-models")
    statuses = browser.find_element(By.ID, "chart-statuses")
    assert days.get_attribute("data-rendered") == "30 points"
    assert models.get_attribute("data-rendered") == "2 points"
    assert statuses.get_attribute("data-rendered") == "6 points"
    for chart in (days, models):
        canvas = chart.find_element(By.TAG_NAME, "canvas")
        assert canvas.size["width"] > 200 and canvas.size["height"] > 100
    # The bars themselves: the models chart's first two palette colours, today's day bar.
    model_canvas = models.find_element(By.TAG_NAME, "canvas")
    assert browser.execute_script(COUNT_COLOR, model_canvas, 0x3F, 0x6F, 0xD8) > 100
    assert browser.execute_script(COUNT_COLOR, model_canvas, 0x2F, 0x9E, 0x5B) > 100
    day_canvas = days.find_element(By.TAG_NAME, "canvas")
    assert browser.execute_script(COUNT_COLOR, day_canvas, 0x3F, 0x6F, 0xD8) > 20
    # The last day, per hour: the four jobs in the current hour, the failed one in red.
    hours = browser.find_element(By.ID, "chart-hours")
    latency = browser.find_element(By.ID, "chart-latency")
    assert hours.get_attribute("data-rendered") == "24 points"
    assert latency.get_attribute("data-rendered") == "24 points"
    hour_canvas = hours.find_element(By.TAG_NAME, "canvas")
    assert browser.execute_script(COUNT_COLOR, hour_canvas, 0x3F, 0x6F, 0xD8) > 20
    assert browser.execute_script(COUNT_COLOR, hour_canvas, 0xD6, 0x45, 0x45) > 5
    latency_canvas = latency.find_element(By.TAG_NAME, "canvas")
    # One hour with jobs: its median and 95th percentile as dots.
    assert browser.execute_script(COUNT_COLOR, latency_canvas, 0x3F, 0x6F, 0xD8) > 10
    assert browser.execute_script(COUNT_COLOR, latency_canvas, 0xE0, 0xA0, 0x30) > 10
    limiter = browser.find_element(By.ID, "limiter").text
    assert SONNET in limiter and HAIKU in limiter
    parts = statuses.find_elements(By.CSS_SELECTOR, ".status-part")
    assert [part.get_attribute("title").split(":")[0] for part in parts] == ["succeeded", "failed"]
    assert all(part.size["width"] > 0 for part in parts)

    # Pointing at the model chart shows a model's exact spend, as the table has it.
    ActionChains(browser).move_to_element(models.find_element(By.CLASS_NAME, "u-over")).perform()
    readout = browser.find_element(By.ID, "readout-models").text
    assert readout.startswith("claude-") and "$" in readout and "job" in readout

    failures = browser.find_element(By.ID, "failures").text
    assert failed["id"] in failures and "invalid_request_error" in failures
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []
