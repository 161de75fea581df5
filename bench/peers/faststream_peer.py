"""Plain FastStream: a ``StreamSub`` consumer group subscriber (XREADGROUP COUNT 256, BLOCK 1 s,
acked after the handler), uvloop; the handler parses the payload, writes a status hash (HSET
state/result/finished_at + EXPIRE, one pipeline) and returns the result JSON, which FastStream
publishes to the results stream (``@broker.publisher(stream=...)``)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

from faststream import FastStream
from faststream.redis import RedisBroker, StreamSub
from faststream.redis.annotations import Redis

from bench.peers.common import TTL_S, echo_result, payload, redis_url

TASKS, RESULTS, GROUP = "fs:tasks", "fs:results", "workers"
RESULTS_STREAM = RESULTS
MAX_WORKERS = int(os.environ.get("BENCH_FS_WORKERS", "64"))
NOTIFY = RESULTS
CONFIG = (
    f"StreamSub(group, consumer, max_records=256, polling_interval=1000 ms), "
    f"max_workers={MAX_WORKERS} (handlers run concurrently), uvloop"
)

broker = RedisBroker(redis_url(), log_level=logging.DEBUG)
app = FastStream(broker)


@broker.subscriber(
    stream=StreamSub(TASKS, group=GROUP, consumer="c1", max_records=256, polling_interval=1000),
    max_workers=MAX_WORKERS,
)
@broker.publisher(stream=RESULTS)
async def echo(data: str, redis: Redis) -> str:
    task_id, result = echo_result(data, "faststream")
    status = f"fs:task:{task_id}"
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hset(
            status,
            mapping={
                "state": "completed",
                "result": result,
                "finished_at": int(time.time() * 1000),
            },
        )
        pipe.expire(status, TTL_S)
        await pipe.execute()
    return result


def worker_cmd(python: str, url: str) -> list[str]:
    return [python, "-m", "bench.peers.faststream_peer"]


class Publisher:
    def __init__(self, url: str) -> None:
        self.broker = RedisBroker(url)

    async def __aenter__(self) -> Publisher:
        await self.broker.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.broker.stop()

    async def publish(self, task_ids: list[str]) -> None:
        for start in range(0, len(task_ids), 8):
            chunk = task_ids[start : start + 8]
            await asyncio.gather(*(self.publish_one(t) for t in chunk))

    async def publish_one(self, task_id: str) -> None:
        await self.broker.publish(payload(task_id), stream=TASKS)


def main() -> int:
    import uvloop

    logging.basicConfig(level=logging.WARNING)
    uvloop.run(app.run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
