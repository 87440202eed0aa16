"""Hosts as network namespaces, for multi-host fault tests and benchmarks: each a namespace
joined to this machine by a veth pair, with loopback-range addresses only (127.77.N.2 in
the namespace, 127.77.N.1 at this machine's end), the conventions of
/work/shared/tools/netns-host, done here so that a test needs nothing outside the
repository and knows every pid it started.

A host reaches this machine's services (PostgreSQL, Redis on 127.0.0.1) through socat
forwards listening on 127.77.N.1. `cut(port)` partitions the host from one forwarded
service alone: tc drops the packets of that port where they arrive, at either end of the
link (the host's requests at this machine's end, the forward's answers at the namespace's),
so that open connections hang and new ones time out, as on a real network, while the
host's other traffic goes on. Killing the forward instead would end its connections (a
crash, not a partition); dropping at the sender's own queue would tell its TCP, which then
recovers on another schedule than from a loss in the network. This kernel has neither tc's
drop action nor netem: a packet is dropped by redirecting it (u32 on the port, the mirred
action) to a link of the host's own that is never brought up.

Needs root, `ip`, `tc` and `socat`. Everything made here is named `pq-partition-PID-...`
after the process that made it: `remove_stale()` takes down what a crashed earlier run
left behind (its processes inside the namespace killed, by namespace), and leaves anyone
else's alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from promptq import supervisor

PREFIX = "pq-partition-"
# 127.77.N.0/24 for N in this range: netns-host's users pick small numbers by hand.
NUMBERS = range(150, 250)


class HostsUnavailable(RuntimeError):
    """This machine cannot make hosts (not root, or a tool missing)."""


def check_available() -> None:
    if os.geteuid() != 0:
        raise HostsUnavailable("network namespaces need root")
    for tool in ("ip", "tc", "socat"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            raise HostsUnavailable(f"{tool} is not installed")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result


def _namespaces() -> list[str]:
    listed = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace(namespace: str) -> None:
    """Every process inside the namespace killed (they are ours: we made it), then it goes,
    and its veth pair with it."""
    pids = _run("ip", "netns", "pids", namespace, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        pids = _run("ip", "netns", "pids", namespace, check=False).stdout.split()
        time.sleep(0.05)
    _run("ip", "netns", "del", namespace, check=False)


def remove_stale() -> list[str]:
    """Take down the namespaces a run that is gone left behind (its pid in their name);
    the names of those removed."""
    removed = []
    for namespace in _namespaces():
        if not namespace.startswith(PREFIX):
            continue
        owner = namespace.removeprefix(PREFIX).split("-", 1)[0]
        if owner.isdigit() and not _pid_alive(int(owner)):
            _kill_namespace(namespace)
            removed.append(namespace)
    return removed


def _free_number() -> int:
    taken = _run("ip", "-o", "addr", "show", check=False).stdout
    links = _run("ip", "-o", "link", "show", check=False).stdout
    for number in NUMBERS:
        if f"127.77.{number}." not in taken and f"pq{number}-h" not in links:
            return number
    raise HostsUnavailable("no free 127.77.N.0/24 left")


class Host:
    """One "machine": a namespace with its own address, its forwards, and cuts."""

    def __init__(self, label: str) -> None:
        self.namespace = f"{PREFIX}{os.getpid()}-{label}"
        self.number = _free_number()
        self.outside = f"pq{self.number}-h"  # this machine's end of the link
        self.inside = f"pq{self.number}-n"  # the namespace's end
        self.sink_outside = f"pq{self.number}-x"  # where dropped packets go, on each side
        self.sink_inside = f"pq{self.number}-y"
        self.address = f"127.77.{self.number}.2"
        self.gateway = f"127.77.{self.number}.1"  # this machine, as the host sees it
        self._forwards: dict[int, subprocess.Popen[bytes]] = {}
        self._cut: set[int] = set()
        self._up = False

    # -- life ---------------------------------------------------------------------------

    def up(self) -> Host:
        ns = self.namespace
        self._up = True  # from here on, down() has something to take down
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", self.outside, "type", "veth", "peer", "name", self.inside)
        _run("ip", "link", "set", self.inside, "netns", ns)
        # Linux drops loopback-range packets on other interfaces unless told otherwise.
        _run("sysctl", "-qw", f"net.ipv4.conf.{self.outside}.route_localnet=1")
        _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.outside)
        _run("ip", "link", "set", self.outside, "up")
        self.run("sysctl", "-qw", f"net.ipv4.conf.{self.inside}.route_localnet=1")
        self.run("ip", "addr", "add", f"{self.address}/24", "dev", self.inside)
        self.run("ip", "link", "set", self.inside, "up")
        self.run("ip", "link", "set", "lo", "up")
        # The drops: a link of its own on each side, never brought up, to which tc
        # redirects what it drops (see the module's docstring), and a clsact qdisc on
        # each end of the host's link to hold the filters.
        sinks = (self.sink_outside, "type", "veth", "peer", "name", self.sink_inside)
        _run("ip", "link", "add", *sinks)
        _run("ip", "link", "set", self.sink_inside, "netns", ns)
        self._tc(False, "qdisc", "add", "dev", self.outside, "clsact")
        self._tc(True, "qdisc", "add", "dev", self.inside, "clsact")
        return self

    def down(self) -> None:
        """Everything this host holds goes: its processes, its forwards, its namespace and
        link (with the tc rules on them). Safe to call twice, or after a failed `up`."""
        for forward in self._forwards.values():
            # The listener and the children it forked for each connection.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(forward.pid, signal.SIGKILL)
            forward.wait()
        self._forwards.clear()
        if self._up:
            _kill_namespace(self.namespace)
            _run("ip", "link", "del", self.outside, check=False)
            _run("ip", "link", "del", self.sink_outside, check=False)
            self._up = False

    # -- what runs there --------------------------------------------------------------

    @property
    def prefix(self) -> list[str]:
        """What runs a command inside the host (supervisor.start's `prefix`)."""
        return ["ip", "netns", "exec", self.namespace]

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return _run(*self.prefix, *argv)

    def forward(self, port: int, to_port: int | None = None) -> str:
        """A service of this machine listening on 127.0.0.1:`to_port` (default `port`)
        made reachable from the host at gateway:`port`; that address."""
        target = to_port or port
        self._forwards[port] = subprocess.Popen(
            [
                "socat",
                # keepalive: socat forks a child per connection, and a child whose client
                # vanished with its namespace (a run killed before it could stop its
                # processes) would otherwise hold its connection to the service forever.
                # 300 s, as Redis's own tcp-keepalive: longer than any cut a test makes.
                f"TCP-LISTEN:{port},bind={self.gateway},reuseaddr,fork,"
                "keepalive,keepidle=300,keepintvl=10,keepcnt=3",
                f"TCP:127.0.0.1:{target}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # A process group of its own, so that down() ends the per-connection children
            # with it; the listener dies with this process even when it is SIGKILLed.
            start_new_session=True,
            preexec_fn=supervisor.set_death_signal,
        )
        supervisor.wait_until(
            lambda: _listening(self.gateway, port), [self._forwards[port]], 10, f"forward {port}"
        )
        return f"{self.gateway}:{port}"

    # -- partitions -----------------------------------------------------------------------

    def cut(self, *ports: int) -> None:
        """The host loses the forwarded services on `ports`: their packets are dropped both
        ways, its other traffic goes on."""
        for port in ports:
            if port in self._cut:
                continue
            # The host's requests go to `port`, the forward's answers come from it.
            self._filter("add", False, "dport", port)
            self._filter("add", True, "sport", port)
            self._cut.add(port)

    def heal(self, *ports: int) -> None:
        for port in ports or tuple(self._cut):
            if port not in self._cut:
                continue
            self._filter("del", False, "dport", port)
            self._filter("del", True, "sport", port)
            self._cut.discard(port)

    def _filter(self, action: str, inside: bool, field: str, port: int) -> None:
        """On arrival at the far end of the link: the sender's TCP saw its packet leave, as
        on a real network. (Dropped by a queue on the sender's own side, it would count as
        local congestion, which TCP recovers from on another schedule.)"""
        device, sink = (
            (self.inside, self.sink_inside) if inside else (self.outside, self.sink_outside)
        )
        # One filter priority per port, so that one port's filter is removed alone.
        command = ["filter", action, "dev", device, "ingress", "prio", str(port)]
        if action == "add":
            # A redirect to a link that is down drops the packet (tc's mirred action; this
            # kernel has no drop action of its own).
            command += ["protocol", "ip", "u32", "match", "ip", field, str(port), "0xffff",
                        "action", "mirred", "egress", "redirect", "dev", sink]  # fmt: skip
        self._tc(inside, *command)

    def _tc(self, inside: bool, *argv: str) -> None:
        _run(*(self.prefix if inside else []), "tc", *argv)


def _listening(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def hosts(labels: Sequence[str]) -> list[Host]:
    """Hosts up, one per label; those already up are taken down if a later one fails."""
    check_available()
    remove_stale()
    made: list[Host] = []
    try:
        for label in labels:
            host = Host(label)
            made.append(host)
            host.up()
    except BaseException:
        for host in made:
            host.down()
        raise
    return made
