"""arq: one worker process, ``max_jobs`` 256, ``poll_delay`` 1 ms (default 0.5 s), per-job
log lines off; the job's return value (the result JSON) is arq's stored result
(``arq:result:<job_id>``: status, timings and result in one pickled record, kept 1 day)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Iterable
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Worker

from bench.peers.common import TTL_S, echo_result, payload, redis_url

NOTIFY = "arq:result:*"
CONFIG = "Worker(max_jobs=256, poll_delay=0.001, keep_result=86400), uvloop, log_results off"


async def echo(ctx: dict[str, Any], data: str) -> str:
    return echo_result(data, "arq")[1]


def done_keys(task_ids: Iterable[str]) -> list[str]:
    return [f"arq:result:{t}" for t in task_ids]


def worker_cmd(python: str, url: str) -> list[str]:
    return [python, "-m", "bench.peers.arq_peer"]


class Publisher:
    def __init__(self, url: str) -> None:
        self.url = url

    async def __aenter__(self) -> Publisher:
        self.pool = await create_pool(RedisSettings.from_dsn(self.url))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pool.aclose()

    async def publish(self, task_ids: list[str]) -> None:
        for start in range(0, len(task_ids), 8):
            chunk = task_ids[start : start + 8]
            await asyncio.gather(*(self.publish_one(t) for t in chunk))

    async def publish_one(self, task_id: str) -> None:
        await self.pool.enqueue_job("echo", payload(task_id), _job_id=task_id)


def main() -> int:
    import uvloop

    logging.basicConfig(level=logging.WARNING)
    uvloop.install()
    worker = Worker(
        functions=[echo],
        redis_settings=RedisSettings.from_dsn(redis_url()),
        max_jobs=256,
        poll_delay=0.001,
        keep_result=TTL_S,
        log_results=False,
        handle_signals=True,
    )
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
