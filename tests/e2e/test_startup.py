"""Starting while Redis is away: a worker waits for it instead of exiting, up to a deadline."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
from redis.asyncio import Redis

from sop_llm.schemas.result import TaskState
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.conftest import RedisServer, free_port, spawn_cli, terminating, wait_for, worker_env

OUTAGE_S = 12


async def test_a_worker_started_during_an_outage_serves_once_redis_is_back(
    tmp_path: Path,
) -> None:
    """Meanwhile its sidecar answers: live, and not ready with the reasons."""
    server = RedisServer(tmp_path / "redis")  # not started yet: Redis is down
    log = tmp_path / "w.log"
    port = free_port()
    env = worker_env(server.url, "startup", block_ms=200, startup_timeout_s=60, sidecar_port=port)
    base = f"http://127.0.0.1:{port}"
    with terminating(spawn_cli(["up"], env, log)) as proc:
        await wait_for(lambda: "redis unreachable at start, waiting" in _text(log), 15)
        began = time.monotonic()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/health/live") as r:
                assert r.status == 200
            async with http.get(f"{base}/health/ready") as r:
                assert r.status == 503
                problems = (await r.json())["problems"]
            assert "worker not started" in problems, problems
            assert any(p.startswith("redis unreachable: ") for p in problems), problems
        # the outage goes on (a fault schedule, not a wait for the worker)
        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - began)))
        assert proc.poll() is None, _text(log)  # still there, waiting: no crash loop
        assert "still waiting for redis" in _text(log)
        server.start()
        try:
            client = Redis.from_url(server.url, socket_timeout=15)
            p = Producer(ProducerConfig(namespace="startup"), client=client)
            task_id = await p.submit("echo", "after the outage", max_tokens=3)
            result = await p.wait(task_id, timeout=30)
            assert result.state == TaskState.COMPLETED
            assert proc.poll() is None  # the same process, never restarted
            assert "redis reachable, starting" in _text(log)
            async with aiohttp.ClientSession() as http, http.get(f"{base}/health/ready") as r:
                assert r.status == 200, await r.text()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 15) == 0
            await client.aclose()
        finally:
            server.stop()


async def test_the_start_up_deadline_ends_the_wait_with_a_clear_error(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")  # never started
    log = tmp_path / "w.log"
    env = worker_env(server.url, "startup", startup_timeout_s=1)
    with terminating(spawn_cli(["worker"], env, log)) as proc:
        code = await asyncio.to_thread(proc.wait, 20)
    assert code == 1
    text = _text(log)
    assert "did not answer for 1 s (SOP_STARTUP_TIMEOUT_S)" in text
    assert f"127.0.0.1:{server.port}" in text  # says which address
    assert "Traceback" not in text


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""
