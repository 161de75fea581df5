"""Redis helpers the harnesses share: a throw-away redis-server for one run, and deleting a
benchmark namespace (SCAN + UNLINK of its keys only). Importable from the peers' venv."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:
    from redis.asyncio import Redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_private_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A throw-away redis-server (no persistence) for this run only: clean commandstats."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    cmd += ["--appendonly", "no", "--dir", str(workdir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            return proc, url
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


async def delete_namespace(client: Redis, namespace: str) -> None:
    # imported here: compare.py loads this module from the peers' venv, without the project's
    # dependencies
    from sop_llm.streams.keys import Keys

    batch: list[Any] = []
    async for key in client.scan_iter(match=Keys(namespace).all_pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            await client.unlink(*batch)
            batch = []
    if batch:
        await client.unlink(*batch)
