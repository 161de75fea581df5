"""Shared fixtures: a real Redis, one namespace per test, private servers for destructive tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import hypothesis  # noqa: F401 - imported at collection: its plugin's late import at the
import pytest  # terminal summary trips CPython 3.11.7's "AST recursion depth mismatch" bug
import redis
from redis.asyncio import Redis

from sop_llm.streams.keys import Keys

SHARED_REDIS_URL = os.environ.get("SOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_url() -> str:
    return SHARED_REDIS_URL


@pytest.fixture
def namespace() -> Iterator[str]:
    """A namespace of this test's own; its keys are deleted afterwards (never FLUSHALL)."""
    ns = f"t{uuid.uuid4().hex[:12]}"
    yield ns
    drop_namespace(ns)


def drop_namespace(namespace: str) -> None:
    """Delete every key of ``namespace`` on the shared Redis (and nothing else)."""
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    try:
        found = list(client.scan_iter(match=Keys(namespace).all_pattern, count=1000))
        for i in range(0, len(found), 500):
            client.delete(*found[i : i + 500])
    finally:
        client.close()


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    c = Redis.from_url(redis_url, socket_timeout=15)
    yield c
    await c.aclose()


class RedisServer:
    """A private redis-server on a free port (for tests that flush, restart or kill Redis)."""

    def __init__(self, workdir: Path, *, appendonly: bool = False, fsync: str = "everysec") -> None:
        self.fsync = fsync
        self.port = free_port()
        self.workdir = workdir
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is required on PATH for private-server tests"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.workdir),
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                c = redis.Redis(port=self.port, socket_timeout=1)
                c.ping()
                c.close()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("private redis-server did not start")

    def kill(self) -> None:
        """Crash it (SIGKILL): only what AOF already holds survives."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def worker_env(redis_url: str, namespace: str, **extra: Any) -> dict[str, str]:
    """Environment for a `sop-llm` subprocess bound to a test's Redis and namespace."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOP_")}
    env.update(
        SOP_REDIS_URL=redis_url,
        SOP_NAMESPACE=namespace,
        SOP_LOG_FORMAT="console",
        PYTHONUNBUFFERED="1",
    )
    env.update({f"SOP_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def spawn_cli(
    args: list[str], env: dict[str, str], log: Path | None = None
) -> subprocess.Popen[bytes]:
    if log is None:
        return subprocess.Popen(
            [sys.executable, "-m", "sop_llm.ops.cli", *args],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "sop_llm.ops.cli", *args],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def wait_for(predicate: Any, timeout: float, interval: float = 0.02) -> Any:
    """Poll an (async) predicate until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


@contextlib.contextmanager
def terminating(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
