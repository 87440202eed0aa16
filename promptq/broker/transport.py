"""kombu's Redis transports, with one redis-py client per connection pool rather than one
per command, and messages put back on their queue one at a time per channel.

kombu's Redis channel wraps its connection pool in a new `redis.Redis` for every publish,
acknowledgement and unacked-message bookkeeping (`Channel.conn_or_acquire`), and redis-py's
constructor copies its ~170 response callbacks into a case-insensitive dict each time
(redis/redis-py#3624): 0.2 to 0.3 ms of CPU, a quarter to a third of what publishing one
job costs the API (docs/benchmarks.md, Throughput), and the same again for each message a worker
takes and acknowledges. A `redis.Redis` over a pool takes a pooled connection for each
command or pipeline and gives it back, so one serves every caller of the channel, threads
and greenlets alike. kombu has no setting for this, hence these subclasses, installed
under kombu's own names for them (`install`).

The channel's other client, the one kombu keeps for BRPOP with a connection of its own
bound to it, is kombu's as before.

Its connections name redis-py to the server as promptq's own clients do
(promptq.redis_roles.DRIVER_INFO), its version read once rather than at every connection.

A message put back on its queue (a task's Reject with requeue: every standby job of a
worker that begins to stop) is, in kombu's acknowledgement emulation, a transaction that
WATCHes the channel's hash of unacknowledged messages, removes the message from it and
pushes it back on its queue; the server refuses it when the hash changed meanwhile, and
redis-py starts it again. Every put-back changes that hash, so a worker putting back its
standby jobs all at once, a greenlet each, had all their transactions but one refused, again
and again: about n²/2 of them for n jobs, and 500 standby jobs kept a warm shutdown busy 13
to 18 s past its last call. `_PuttingBackInTurn` lets one at a time through per channel,
each then done in one transaction unless an acknowledgement lands in between.
"""

from __future__ import annotations

import threading
from typing import Any

import kombu.transport
from kombu.transport import redis as kombu_redis

from promptq.redis_roles import DRIVER_INFO

_CLIENT = "_promptq_client"


class _OneClientPerPool:
    """Mixed into a kombu Redis channel: its plain (not asynchronous) client, made once per
    connection pool (kombu replaces the pool when it reconnects; a client of an old pool is
    never handed out again), and its connections' driver info."""

    pool: Any

    def _connparams(self, asynchronous: bool = False) -> Any:
        params = super()._connparams(asynchronous)  # type: ignore[misc]
        params.setdefault("driver_info", DRIVER_INFO)
        return params

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[misc]
        pool = self.pool
        client = self.__dict__.get(_CLIENT)
        if client is None or client.connection_pool is not pool:
            client = super()._create_client()  # type: ignore[misc]
            self.__dict__[_CLIENT] = client
        return client


class _PuttingBackInTurn(kombu_redis.QoS):
    """kombu's acknowledgement emulation for one channel, its put-backs one at a time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # gevent's lock in a patched worker: a greenlet waiting its turn lets others run.
        self._turn = threading.Lock()

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        with self._turn:
            super().restore_by_tag(tag, client, leftmost)


class Channel(_OneClientPerPool, kombu_redis.Channel):
    QoS = _PuttingBackInTurn


class SentinelChannel(_OneClientPerPool, kombu_redis.SentinelChannel):
    QoS = _PuttingBackInTurn


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


# kombu's names (URL schemes) for its Redis transports, and ours for each.
_TRANSPORTS = {
    "redis": f"{__name__}:Transport",
    "rediss": f"{__name__}:Transport",
    "sentinel": f"{__name__}:SentinelTransport",
}


def install() -> None:
    """Have kombu build these transports for redis://, rediss:// and sentinel:// brokers in
    this process. Under kombu's own names, not as a `broker_transport` class path: the name
    is what a connection reports as its URL's scheme (Flower reads the broker's queues by
    it) and what turns TLS on for rediss://. kombu caches the class it resolved for a name
    (a private dict: were it renamed, a name resolved before this would keep kombu's own
    class, and tests/stack/test_broker_transport.py fail), so that entry goes too."""
    resolved = getattr(kombu.transport, "_transport_cache", {})
    for name, path in _TRANSPORTS.items():
        kombu.transport.TRANSPORT_ALIASES[name] = path
        resolved.pop(name, None)
