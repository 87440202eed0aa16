"""The worker's delivery pool (worker.deliveries) fed from an in-memory source: it takes ids
only while it has a free thread, one key's POSTs hold only their share, a key's deliveries
past its share wait for it (or are postponed past the key's line), retries come back,
shutdown lets the POSTs in flight finish, and deliveries their creators claimed are handed
over within the same shares. The Redis source and the real sender are the
stack room's (test_webhook_deliveries, test_webhook_isolation)."""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from promptq.webhooks.deliveries import PreparedDelivery
from worker import deliveries as pool_module
from worker.deliveries import DeliveryPool


class ListSource:
    def __init__(self) -> None:
        self.ids: queue.Queue[str] = queue.Queue()
        self.taken = 0

    def take(self, timeout: float) -> str | None:
        try:
            delivery_id = self.ids.get(timeout=timeout)
        except queue.Empty:
            return None
        self.taken += 1
        return delivery_id


class GatedSender:
    """Does what worker.delivery_sending does, with an id `KEY:N` for a delivery of KEY and
    a POST that lasts until its key's gate opens."""

    def __init__(self) -> None:
        self.gates: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        self.posting: Counter[str] = Counter()
        self.most_posting: Counter[str] = Counter()
        self.sent: list[str] = []
        self.postponed: list[str] = []
        self.fail_first: set[str] = set()
        self.retry_in = 0.05
        self.claimed_sent: list[str] = []
        self.unclaimed: list[str] = []
        # What had been sent when the pool closed the sender (None: not closed).
        self.sent_when_closed: list[str] | None = None

    def gate(self, key: str) -> threading.Event:
        with self.lock:
            return self.gates.setdefault(key, threading.Event())

    def __call__(self, delivery_id: str, pool: DeliveryPool) -> None:
        key = delivery_id.split(":")[0]
        if not pool.try_reserve(key):
            if not pool.wait_for_room(key, delivery_id):
                with self.lock:
                    self.postponed.append(delivery_id)
            return
        self._post(delivery_id, key, pool)

    def send_claimed(self, prepared: PreparedDelivery, pool: DeliveryPool) -> None:
        # Its key's room was taken by the pool.
        with self.lock:
            self.claimed_sent.append(prepared.id)
        self._post(prepared.id, prepared.key_id, pool)

    def unclaim(self, delivery_ids: list[str]) -> None:
        with self.lock:
            self.unclaimed += delivery_ids

    def close(self) -> None:
        with self.lock:
            self.sent_when_closed = list(self.sent)

    def _post(self, delivery_id: str, key: str, pool: DeliveryPool) -> None:
        try:
            with self.lock:
                self.posting[key] += 1
                self.most_posting[key] = max(self.most_posting[key], self.posting[key])
            assert self.gate(key).wait(10)
            with self.lock:
                self.posting[key] -= 1
                failed = delivery_id in self.fail_first
                self.fail_first.discard(delivery_id)
                if not failed:
                    self.sent.append(delivery_id)
        finally:
            pool.release(key)
        if failed:
            pool.retry_later(delivery_id, self.retry_in)


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def source() -> ListSource:
    return ListSource()


@pytest.fixture
def sender() -> GatedSender:
    return GatedSender()


@pytest.fixture
def make_pool(
    source: ListSource, sender: GatedSender, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[int, int], DeliveryPool]]:
    monkeypatch.setattr(pool_module, "POLL_SECONDS", 0.05)
    pools: list[DeliveryPool] = []

    def make(threads: int, per_key: int) -> DeliveryPool:
        pool = DeliveryPool(threads, per_key, source, sender)
        pool.start()
        pools.append(pool)
        return pool

    yield make
    for gate in sender.gates.values():
        gate.set()
    for pool in pools:
        pool.shutdown()


def test_one_key_holds_only_its_share_and_the_rest_wait_for_it(
    make_pool: Callable[[int, int], DeliveryPool], source: ListSource, sender: GatedSender
) -> None:
    make_pool(4, 2)
    for n in range(10):
        source.ids.put(f"hole:{n}")
    source.ids.put("polite:0")
    sender.gate("polite").set()
    # Another key's delivery goes while the first key's two POSTs hang.
    wait_until(lambda: "polite:0" in sender.sent)
    assert sender.posting["hole"] == 2
    # Its other eight wait here for its room, not in the database.
    sender.gate("hole").set()
    wait_until(lambda: len(sender.sent) == 11)
    assert sender.most_posting["hole"] == 2 and sender.postponed == []


def test_ids_stay_at_the_source_while_every_thread_is_busy(
    make_pool: Callable[[int, int], DeliveryPool], source: ListSource, sender: GatedSender
) -> None:
    make_pool(2, 2)
    for n in range(5):
        source.ids.put(f"k{n}:0")
    wait_until(lambda: sum(sender.posting.values()) == 2)
    time.sleep(0.2)
    assert source.taken == 2 and source.ids.qsize() == 3
    for n in range(5):
        sender.gate(f"k{n}").set()
    wait_until(lambda: len(sender.sent) == 5)


def test_past_the_keys_line_a_delivery_is_postponed(
    make_pool: Callable[[int, int], DeliveryPool],
    source: ListSource,
    sender: GatedSender,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pool_module, "WAITING_PER_KEY", 3)
    make_pool(4, 1)
    for n in range(6):
        source.ids.put(f"hole:{n}")
    wait_until(lambda: len(sender.postponed) == 2)
    sender.gate("hole").set()
    wait_until(lambda: len(sender.sent) == 4)
    assert sorted(sender.sent + sender.postponed) == [f"hole:{n}" for n in range(6)]


def test_a_failed_delivery_comes_back_after_its_delay(
    make_pool: Callable[[int, int], DeliveryPool], source: ListSource, sender: GatedSender
) -> None:
    make_pool(2, 2)
    sender.fail_first.add("k:0")
    sender.retry_in = 0.3
    sender.gate("k").set()
    started = time.monotonic()
    source.ids.put("k:0")
    wait_until(lambda: sender.sent == ["k:0"])
    assert time.monotonic() - started >= 0.3


def test_a_retry_too_far_off_is_left_to_the_sweeper(
    make_pool: Callable[[int, int], DeliveryPool], source: ListSource, sender: GatedSender
) -> None:
    pool = make_pool(2, 2)
    sender.fail_first.add("k:0")
    sender.retry_in = pool_module.MAX_LOCAL_RETRY_SECONDS + 1
    sender.gate("k").set()
    source.ids.put("k:0")
    wait_until(lambda: "k:0" not in sender.fail_first)
    time.sleep(0.2)
    assert sender.sent == [] and pool._retries == []


def test_shutdown_lets_the_posts_in_flight_finish(
    make_pool: Callable[[int, int], DeliveryPool], source: ListSource, sender: GatedSender
) -> None:
    pool = make_pool(2, 2)
    source.ids.put("k:0")
    wait_until(lambda: sender.posting["k"] == 1)
    threading.Timer(0.2, sender.gate("k").set).start()
    pool.shutdown()
    assert sender.sent == ["k:0"]
    # Closed once the POST in flight had ended, so that its record is written before the
    # worker exits.
    assert sender.sent_when_closed == ["k:0"]
    # Stopped: nothing more is taken.
    source.ids.put("k:1")
    time.sleep(0.2)
    assert source.ids.qsize() == 1


def claimed(delivery_id: str) -> PreparedDelivery:
    """A delivery `KEY:N` its creator wrote claimed (promptq.webhooks.deliveries)."""
    return PreparedDelivery(delivery_id, "http://receiver", b"{}", {}, 1, delivery_id.split(":")[0])


def hand_over(pool: DeliveryPool, key: str, count: int) -> None:
    """`count` deliveries of `key` (KEY:0, ...) handed over, as a job's record does."""
    for n in range(count):
        assert pool.take_room(key)
        pool.hand_over(claimed(f"{key}:{n}"))


def test_a_delivery_handed_over_is_sent_at_once_without_the_source(
    make_pool: Callable[[int, int], DeliveryPool], source: ListSource, sender: GatedSender
) -> None:
    pool = make_pool(2, 2)
    sender.gate("k").set()
    assert pool.take_room("k")
    pool.hand_over(claimed("k:0"))
    wait_until(lambda: sender.sent == ["k:0"])
    assert sender.claimed_sent == ["k:0"] and source.taken == 0


def test_deliveries_handed_over_keep_to_their_keys_share_and_wait_for_it(
    make_pool: Callable[[int, int], DeliveryPool],
    sender: GatedSender,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pool_module, "HANDED_PER_KEY", 2)
    monkeypatch.setattr(pool_module, "HANDED_IN_ALL", 4)
    pool = make_pool(4, 2)
    hand_over(pool, "hole", 2)
    wait_until(lambda: sender.posting["hole"] == 2)
    # Two more of the key wait here, claimed, for its room; a third is refused (published
    # by its creator as any other), and so is a fifth of the pool's four in all.
    assert pool.take_room("hole") and pool.take_room("hole")
    assert not pool.take_room("hole")
    pool.hand_over(claimed("hole:2"))
    pool.hand_over(claimed("hole:3"))
    assert pool.take_room("other") and pool.take_room("other")
    assert not pool.take_room("third")
    pool.give_room_back("other")
    pool.give_room_back("other")
    time.sleep(0.1)
    assert sender.posting["hole"] == 2
    sender.gate("hole").set()
    wait_until(lambda: len(sender.sent) == 4)
    assert sender.most_posting["hole"] == 2
    assert sorted(sender.claimed_sent) == [f"hole:{n}" for n in range(4)]
    # All of it given back: the pool takes as many again.
    assert all(pool.take_room(key) for key in ("a", "a", "b", "b"))


def test_a_stopped_pool_takes_no_delivery_handed_over(
    make_pool: Callable[[int, int], DeliveryPool],
) -> None:
    pool = make_pool(2, 2)
    pool.shutdown()
    assert not pool.take_room("k")


def test_a_delivery_handed_over_that_waited_too_long_is_left_to_the_sweeper(
    make_pool: Callable[[int, int], DeliveryPool],
    sender: GatedSender,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Sent after its claim's lease ran out, it could go twice (the sweeper's sender too).
    monkeypatch.setattr(pool_module, "HANDED_MAX_WAIT_SECONDS", 0.1)
    pool = make_pool(2, 1)
    hand_over(pool, "k", 2)
    wait_until(lambda: sender.posting["k"] == 1)
    time.sleep(0.2)
    sender.gate("k").set()
    wait_until(lambda: sender.sent == ["k:0"] and pool.in_flight() == {})
    time.sleep(0.1)
    assert sender.claimed_sent == ["k:0"]


def test_a_stopping_pool_gives_back_the_claims_of_what_waits_there(
    make_pool: Callable[[int, int], DeliveryPool], sender: GatedSender
) -> None:
    # Left to the sweeper, due at once rather than when their leases run out.
    pool = make_pool(2, 1)
    hand_over(pool, "k", 3)
    wait_until(lambda: sender.posting["k"] == 1)
    assert pool.take_room("late")  # its record still running
    threading.Timer(0.2, sender.gate("k").set).start()
    pool.shutdown()
    assert sender.sent == ["k:0"] and sorted(sender.unclaimed) == ["k:1", "k:2"]
    # Handed over once the pool has stopped: given back too, never sent.
    pool.hand_over(claimed("late:0"))
    assert sender.unclaimed[-1] == "late:0" and sender.sent == ["k:0"]
