"""A worker that dies mid-task: `submit --wait` says so instead of timing out in silence."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

from redis.asyncio import Redis

from sop_llm.schemas.result import TaskState
from sop_llm.streams.keys import Keys
from sop_llm.streams.status import read_status
from tests.conftest import ROOT, spawn_cli, terminating, wait_for, worker_env


async def test_submit_wait_names_the_worker_whose_lease_lapsed(
    client: Redis, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    # a slow echo (4 tokens a second), a short lease, and no other worker to take over
    env = worker_env(redis_url, namespace, echo_tokens_per_s=4, lease_ttl_ms=1000, block_ms=200)
    keys = Keys(namespace)
    with terminating(spawn_cli(["worker"], env, tmp_path / "w.log")) as worker:
        await wait_for(lambda: _a_lease(client, keys), 20)
        submit = subprocess.Popen(
            [sys.executable, "-m", "sop_llm.ops.cli", "submit", "--prompt",
             "a b c d e f g h i j k l",
             "--max-tokens", "12", "--wait", "8"],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert submit.stdout is not None
            task_id = (await asyncio.to_thread(submit.stdout.readline)).decode().strip()

            async def running() -> bool:
                record = await read_status(client, keys, task_id)
                return record is not None and record.state == TaskState.RUNNING

            await wait_for(running, 10)
            worker.send_signal(signal.SIGKILL)  # dies mid-task, lease and all
            _, err = await asyncio.to_thread(submit.communicate, timeout=30)
        finally:
            if submit.poll() is None:
                submit.kill()
                submit.communicate()
    message = err.decode()
    assert submit.returncode != 0  # the wait timed out: nothing took the task over
    assert f"task {task_id} is held by worker " in message, message
    assert "whose lease has lapsed" in message, message
    assert message.count("whose lease has lapsed") == 1  # said once, not every poll


async def _a_lease(client: Redis, keys: Keys) -> bool:
    return bool([k async for k in client.scan_iter(match=keys.worker("*"))])
