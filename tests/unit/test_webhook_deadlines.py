"""The deadlines of webhook POSTs (promptq.webhooks.deadlines): one watcher thread shuts a
POST's sockets down when its deadline passes, and never those of a POST that ended first.
Each test has a watcher of its own and a socket pair for a connection."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from promptq.webhooks.deadlines import COMPACT_ABOVE, Deadline, DeadlineWatcher


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def watcher_threads() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name == "webhook-deadlines")


def test_a_passed_deadline_ends_a_blocked_read(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    deadline = Deadline(0.2, DeadlineWatcher())
    deadline.watch(ours)
    started = time.monotonic()
    ours.settimeout(5)
    # The peer never writes: only the deadline ends this read, with the end of the stream.
    assert ours.recv(10) == b""
    assert 0.15 < time.monotonic() - started < 2
    assert deadline.expired
    deadline.close()


def test_a_closed_deadline_leaves_the_connection_alone(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    deadline = Deadline(0.05, DeadlineWatcher())
    deadline.watch(ours)
    deadline.close()
    time.sleep(0.3)
    assert not deadline.expired
    theirs.sendall(b"still here")
    ours.settimeout(1)
    assert ours.recv(10) == b"still here"


def test_a_socket_watched_after_the_deadline_is_shut_at_once(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = pair
    deadline = Deadline(0.0, DeadlineWatcher())
    waited = time.monotonic() + 2
    while not deadline.expired and time.monotonic() < waited:
        time.sleep(0.01)
    assert deadline.expired
    deadline.watch(ours)
    ours.settimeout(1)
    assert ours.recv(10) == b""
    deadline.close()


def test_an_earlier_deadline_wakes_the_watcher(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    watcher = DeadlineWatcher()
    later = Deadline(30, watcher)
    sooner = Deadline(0.1, watcher)
    sooner.watch(ours)
    ours.settimeout(5)
    # The watcher was waiting for the 30 s one: the new first one must wake it.
    assert ours.recv(10) == b""
    assert sooner.expired and not later.expired
    sooner.close()
    later.close()


def test_deadlines_expire_in_their_order_whatever_the_order_given() -> None:
    watcher = DeadlineWatcher()
    deadlines = [Deadline(seconds, watcher) for seconds in (0.9, 0.1, 0.5)]
    expired: list[int] = []
    waited = time.monotonic() + 5
    while len(expired) < 3 and time.monotonic() < waited:
        expired += [
            i for i, deadline in enumerate(deadlines) if deadline.expired and i not in expired
        ]
        time.sleep(0.01)
    assert expired == [1, 2, 0]
    assert watcher.pending() == 0


def test_one_thread_watches_every_deadline() -> None:
    before = watcher_threads()
    watcher = DeadlineWatcher()
    deadlines = [Deadline(30, watcher) for _ in range(50)]
    assert watcher_threads() == before + 1
    assert watcher.pending() == 50
    for deadline in deadlines:
        deadline.close()
    assert watcher.pending() == 0


def test_deadlines_of_posts_that_ended_do_not_pile_up() -> None:
    watcher = DeadlineWatcher()
    kept = Deadline(60, watcher)
    for _ in range(3 * COMPACT_ABOVE):
        Deadline(60, watcher).close()
    # Each POST of a busy process closes its deadline long before it would pass.
    assert watcher.held() <= COMPACT_ABOVE + 1
    assert watcher.pending() == 1
    kept.close()
