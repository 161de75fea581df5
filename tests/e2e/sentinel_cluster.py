"""A master, a replica and three Sentinels (quorum 2) on loopback, each in a folder of its own
under the test's temporary folder, for failover tests. Nothing persists: a server that is
killed and started again comes back empty."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis

from tests.conftest import free_port

MASTER_NAME = "sop-ha"


class SentinelCluster:
    """Started by :func:`sentinel_cluster`; every process it started is killed at the end."""

    def __init__(self, workdir: Path, exe: str) -> None:
        self.workdir = workdir
        self.exe = exe
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.master_port = 0
        self.replica_port = 0
        self.sentinel_ports: list[int] = []

    @property
    def sentinels(self) -> tuple[tuple[str, int], ...]:
        return tuple(("127.0.0.1", port) for port in self.sentinel_ports)

    @property
    def sentinels_setting(self) -> str:
        """The value of ``SOP_REDIS_SENTINELS``."""
        return ",".join(f"{host}:{port}" for host, port in self.sentinels)

    def start(self) -> None:
        self.master_port = self._server("master")
        self.replica_port = self._server("replica", "--replicaof", "127.0.0.1", self.master_port)
        _wait(lambda: _replica_online(self.master_port), 20, "the replica's first sync")
        # started once the replica is online: their first INFO of the master names it
        self.sentinel_ports = [self._sentinel(i) for i in range(3)]
        _wait(self._sentinels_agree, 30, "three sentinels that see the master and the replica")

    def server(self, port: int, **kwargs: Any) -> Redis:
        """A client of one server, not following any failover (close it)."""
        return Redis(host="127.0.0.1", port=port, socket_timeout=5, **kwargs)

    async def named_master(self) -> int:
        """The master's port as the first sentinel names it now."""
        async with Redis(port=self.sentinel_ports[0], socket_timeout=5) as sentinel:
            address = await sentinel.sentinel_get_master_addr_by_name(MASTER_NAME)
        assert isinstance(address, tuple), address
        return int(address[1])

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(10)

    def pause(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGSTOP)

    def resume(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGCONT)

    def restart_as_replica(self, port: int, of: int) -> None:
        """Start a killed server again on its port, empty, as a replica of ``of`` (without
        waiting for it: its log is in its folder)."""
        assert port not in self.procs
        self._spawn(port, f"rejoined-{port}", "--replicaof", "127.0.0.1", of)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a paused process dies only once resumed
                proc.kill()
        for proc in self.procs.values():
            proc.wait(10)
        self.procs.clear()

    def _server(self, name: str, *args: str | int) -> int:
        # a free port can be taken again before the server binds it: try another one then
        for attempt in range(4):
            port = free_port()
            self._spawn(port, f"{name}-{attempt}", *args)
            if _started(port, self.procs[port]):
                return port
            self.kill(port)
        raise RuntimeError(f"the {name} did not start on any of 4 ports")

    def _spawn(self, port: int, name: str, *args: str | int) -> None:
        folder = self.workdir / name
        folder.mkdir(parents=True)
        cmd = [
            self.exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
            "--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0",
            "--logfile", str(folder / "redis.log"), *(str(a) for a in args),
        ]  # fmt: skip
        self.procs[port] = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def _sentinel(self, index: int) -> int:
        for attempt in range(4):
            port = free_port()
            folder = self.workdir / f"sentinel-{index}-{attempt}"
            folder.mkdir(parents=True)
            conf = folder / "sentinel.conf"  # a sentinel rewrites its own file
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\nlogfile {folder / 'sentinel.log'}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                f"sentinel failover-timeout {MASTER_NAME} 5000\n"
            )
            self.procs[port] = subprocess.Popen(
                [self.exe, str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if _started(port, self.procs[port]):
                return port
            self.kill(port)
        raise RuntimeError("a sentinel did not start on any of 4 ports")

    def _sentinels_agree(self) -> bool:
        for port in self.sentinel_ports:
            with redis.Redis(port=port, socket_timeout=5, decode_responses=True) as sentinel:
                master = sentinel.sentinel_master(MASTER_NAME)
                replicas = sentinel.sentinel_slaves(MASTER_NAME)
            if int(master["port"]) != self.master_port or master["num-other-sentinels"] != 2:
                return False
            if [int(r["port"]) for r in replicas if r["master-link-status"] == "ok"] != [
                self.replica_port
            ]:
                return False
        return True


@contextlib.contextmanager
def sentinel_cluster(workdir: Path) -> Iterator[SentinelCluster]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not on PATH")
    cluster = SentinelCluster(workdir, exe)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def _answers(port: int) -> bool:
    with redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1) as c:
        return bool(c.ping())


def _replica_online(master_port: int) -> bool:
    with redis.Redis(port=master_port, socket_timeout=5, decode_responses=True) as c:
        info = c.info("replication")
    slave = info.get("slave0")
    return isinstance(slave, dict) and slave.get("state") == "online"


def _started(port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> bool:
    """Whether the server on ``port`` answers; false once ``proc`` exited (its port was taken)
    or after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(redis.RedisError):
            if _answers(port):
                return True
        time.sleep(0.05)
    return False


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.RedisError):
            if check():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)
