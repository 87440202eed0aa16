"""The word that a job finished: published by the worker side, heard by the API's one
subscription per process, waking exactly the requests held open on that job."""

from __future__ import annotations

import asyncio

import redis

from api.listener import FinishedJobs
from promptq.jobs.announcements import announce


def test_an_announced_job_wakes_its_waiters_and_no_others(redis_url: str) -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        listener = FinishedJobs(redis_url)
        listener.start()
        try:
            for _ in range(100):  # the subscription takes a moment to be made
                if listener.subscribed:
                    break
                await asyncio.sleep(0.02)
            assert listener.subscribed
            client = redis.Redis.from_url(redis_url)
            with (
                listener.watching("job_a") as first,
                listener.watching("job_a") as second,
                listener.watching("job_b") as other,
            ):
                await asyncio.to_thread(announce, client, "job_a")
                return await first.pause(10), await second.pause(10), await other.pause(0.3)
        finally:
            await listener.stop()

    assert asyncio.run(scenario()) == (True, True, False)


def test_without_its_subscription_a_watch_is_plain_polling() -> None:
    # Never started, as while Redis is away: nothing wakes the watch, and its pause is the
    # short polling interval's.
    async def scenario() -> bool:
        with FinishedJobs("redis://127.0.0.1:1/0").watching("job_x") as watch:
            return await watch.pause(0.05)

    assert asyncio.run(scenario()) is False


def test_announcing_never_fails_a_job() -> None:
    # Nothing listens on port 1: the publish fails, quietly.
    announce(redis.Redis(port=1, socket_connect_timeout=0.2), "job_y")
