"""Celery with the Redis broker and the Redis result backend: one worker process, ``--pool
solo`` (tasks run in the consuming process: no IPC to a child), prefetch multiplier 256,
gossip/mingle/heartbeat/events off, JSON serializer; the task's return value (the result JSON)
is stored by the backend as ``celery-task-meta-<id>`` (status SUCCESS, result, date_done)."""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery

from bench.peers.common import TTL_S, echo_result, payload, redis_url

NOTIFY = "celery-task-meta-*"
CONFIG = (
    "worker --pool solo --prefetch-multiplier 256 --without-gossip --without-mingle "
    "--without-heartbeat, task_acks_late off, result_expires 1 day, json"
)
_CONF = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "result_expires": TTL_S,
    "worker_prefetch_multiplier": 256,
    "worker_send_task_events": False,
    "task_send_sent_event": False,
    "broker_connection_retry_on_startup": True,
    "worker_hijack_root_logger": False,
}

app = Celery("bench", broker=redis_url(), backend=redis_url())
app.conf.update(_CONF)


@app.task(name="echo")
def echo(data: str) -> str:
    return echo_result(data, "celery")[1]


def done_keys(task_ids: Iterable[str]) -> list[str]:
    return [f"celery-task-meta-{t}" for t in task_ids]


def worker_cmd(python: str, url: str) -> list[str]:
    return [
        python, "-m", "celery", "-A", "bench.peers.celery_peer", "worker", "--pool", "solo",
        "--loglevel", "WARNING", "--prefetch-multiplier", "256", "--without-gossip",
        "--without-mingle", "--without-heartbeat", "-Q", "celery",
    ]  # fmt: skip


class Publisher:
    """The producer app has no result backend, so it does not subscribe to each task's result
    channel (what ``apply_async`` does with the Redis backend); the worker stores results."""

    def __init__(self, url: str) -> None:
        self.app = Celery("bench-producer", broker=url)
        self.app.conf.update(_CONF)

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.app.close()

    async def publish(self, task_ids: list[str]) -> None:
        with self.app.producer_or_acquire() as producer:
            for t in task_ids:
                self.app.send_task("echo", args=(payload(t),), task_id=t, producer=producer)

    async def publish_one(self, task_id: str) -> None:
        self.app.send_task("echo", args=(payload(task_id),), task_id=task_id)
