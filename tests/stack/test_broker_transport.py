"""promptq.broker.transport: kombu's Redis channel with one redis-py client per connection
pool and its messages put back one at a time, under kombu's own transport names, against a
real Redis."""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import redis.client
from helpers import assert_named_as_redis_py, record_redis_trips
from kombu import Connection, Consumer
from kombu.message import Message
from kombu.transport import get_transport_cls

from promptq.broker import transport
from promptq.broker.celery_app import QUEUE, create_celery
from promptq.broker.publish import broker_backlog, publish_job
from promptq.config import Settings
from promptq.redis_keys import published_marker


@pytest.fixture
def quiet_settings(quiet_env: dict[str, str]) -> Settings:
    return Settings(
        database_url="sqlite:///unused.db",
        redis_url=quiet_env["PROMPTQ_REDIS_URL"],
        upstream_url="http://127.0.0.1:9",
        upstream_api_key=quiet_env["PROMPTQ_UPSTREAM_API_KEY"],
    )


@pytest.fixture
def clients_made(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every redis.Redis built from here on (kombu's and anyone's in this process)."""
    made: list[Any] = []
    build = redis.client.Redis.__init__

    def counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        build(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Redis, "__init__", counting_init)
    return made


def test_publishing_many_jobs_builds_one_client(
    quiet_settings: Settings, clients_made: list[Any]
) -> None:
    app = create_celery(quiet_settings)
    publish_job(app, "job_warm")  # the producer pool's connection and channel
    clients_made.clear()
    for index in range(20):
        publish_job(app, f"job_transport_{index}")
    # Without promptq's channel: one for each publish (kombu's batch, which carries the
    # message and its marker).
    assert len(clients_made) <= 1
    broker = redis.Redis.from_url(quiet_settings.redis_url)
    assert broker.exists(published_marker("job_transport_19"))
    assert broker_backlog(app) == 21


def test_a_new_pool_gets_a_new_client(quiet_settings: Settings) -> None:
    """kombu drops its pool when it reconnects; the client of the old one is not reused."""
    app = create_celery(quiet_settings)
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        assert isinstance(channel, transport.Channel)
        first = channel._create_client()
        assert channel._create_client() is first
        channel._pool = None
        second = channel._create_client()
        assert second is not first
        assert second.connection_pool is channel.pool
        assert second.ping()
        # The BRPOP client, with a connection bound to it, stays kombu's own.
        assert channel._create_client(asynchronous=True) is not channel._create_client(
            asynchronous=True
        )


def test_the_transports_keep_kombus_names(quiet_settings: Settings) -> None:
    app = create_celery(quiet_settings)
    with app.connection_for_write() as connection:
        # Flower reads the broker's queues by the scheme of this URL.
        assert urlsplit(connection.as_uri()).scheme == "redis"
    assert get_transport_cls("redis") is transport.Transport
    assert get_transport_cls("sentinel") is transport.SentinelTransport
    assert transport.SentinelTransport.Channel is transport.SentinelChannel
    # A Sentinel group's channel puts its messages back in turn as well.
    assert transport.SentinelChannel.QoS is transport.Channel.QoS
    # rediss:// still turns TLS on (kombu does by the transport's name).
    secure = Connection("rediss://127.0.0.1:6380/0")
    assert secure.transport_cls == "rediss"
    assert secure.ssl
    assert isinstance(secure.transport, transport.Transport)


def test_kombus_connections_name_redis_py_without_reading_its_metadata(
    quiet_settings: Settings, version_never_read: None
) -> None:
    app = create_celery(quiet_settings)
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        # Each opens a connection of its own: one that read the metadata would fail here.
        for client in (channel._create_client(), channel._create_client(asynchronous=True)):
            assert client.ping()
            assert_named_as_redis_py(client)


PUT_BACK = 40


def test_messages_put_back_at_once_take_one_transaction_each(
    quiet_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a worker's standby jobs are put back when it begins to stop, a greenlet each:
    every message back on its queue, each in one transaction, none refused by the server
    and started again (kombu's own channel: several times as many)."""
    app = create_celery(quiet_settings)
    for index in range(PUT_BACK):
        publish_job(app, f"job_put_back_{index}")
    taken: list[Message] = []
    with app.connection_for_read() as connection:
        channel = connection.channel()
        queue = app.amqp.queues[QUEUE]
        with Consumer(channel, [queue], callbacks=[lambda _, m: taken.append(m)], accept=["json"]):
            while len(taken) < PUT_BACK:
                connection.drain_events(timeout=5)
        assert broker_backlog(app) == 0
        trips: list[list[str]] = []
        record_redis_trips(monkeypatch, lambda _: True, trips)
        together = threading.Barrier(PUT_BACK)

        def put_back(message: Message) -> None:
            together.wait()
            message.reject(requeue=True)

        threads = [threading.Thread(target=put_back, args=(m,)) for m in taken]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        channel.close()
    assert broker_backlog(app) == PUT_BACK
    assert sum(trip.count("WATCH") for trip in trips) == PUT_BACK
