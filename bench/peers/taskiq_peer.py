"""taskiq with taskiq-redis's ``RedisStreamBroker`` (consumer group on a stream) and
``RedisAsyncResultBackend``: one worker process, ``--max-async-tasks 256``, XREADGROUP COUNT
256, acked when the result is saved (``--ack-type when_saved``); the result (the result JSON,
with taskiq's is_err/log/execution_time fields) is stored under the task id, 1 day TTL."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from bench.peers.common import TTL_S, echo_result, payload, redis_url

NOTIFY = "tq.*"
CONFIG = (
    "RedisStreamBroker(xread_count=256), RedisAsyncResultBackend(result_ex_time=86400); "
    "taskiq worker --workers 1 --max-async-tasks 256 --ack-type when_saved, uvloop"
)

broker = RedisStreamBroker(redis_url(), queue_name="tq:tasks", consumer_id="0", xread_count=256)
broker = broker.with_result_backend(RedisAsyncResultBackend(redis_url(), result_ex_time=TTL_S))


@broker.task(task_name="echo")
async def echo(data: str) -> str:
    return echo_result(data, "taskiq")[1]


def done_keys(task_ids: Iterable[str]) -> list[str]:
    return list(task_ids)


def worker_cmd(python: str, url: str) -> list[str]:
    return [
        python, "-m", "taskiq", "worker", "bench.peers.taskiq_peer:broker", "--workers", "1",
        "--max-async-tasks", "256", "--ack-type", "when_saved", "--log-level", "WARNING",
    ]  # fmt: skip


class Publisher:
    def __init__(self, url: str) -> None:
        self.url = url

    async def __aenter__(self) -> Publisher:
        await broker.startup()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await broker.shutdown()

    async def publish(self, task_ids: list[str]) -> None:
        for start in range(0, len(task_ids), 8):
            chunk = task_ids[start : start + 8]
            await asyncio.gather(*(self.publish_one(t) for t in chunk))

    async def publish_one(self, task_id: str) -> None:
        await echo.kicker().with_task_id(task_id).kiq(payload(task_id))
