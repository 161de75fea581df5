"""Waiting for what the workers did, instead of sleeping while they might still do it."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from sop_llm.streams.entries import text
from sop_llm.streams.keys import TASK_GROUP, Keys


async def wait_settled(client: Redis, keys: Keys, stream: str, timeout: float = 30.0) -> None:
    """Wait until the task group of ``stream`` has no entry pending or undelivered and no retry
    is waiting: nothing is left to run, so no run starts after this (a run's entry stays
    pending until its terminal write, which carries the XACK).

    A run already going may still write: stop the workers too before counting what they wrote.
    Raises :class:`AssertionError` saying what was still outstanding after ``timeout`` s.
    """
    outstanding = "nothing read yet"
    try:
        async with asyncio.timeout(timeout):
            while True:
                async with client.pipeline(transaction=True) as pipe:  # one consistent view
                    pipe.xinfo_stream(stream)
                    pipe.xinfo_groups(stream)
                    pipe.zcard(keys.tasks_delayed)
                    info, groups, delayed = await pipe.execute()
                [group] = [g for g in groups if text(g["name"]) == TASK_GROUP]
                last = text(info["last-generated-id"])
                delivered = text(group["last-delivered-id"])
                if group["pending"] == 0 and delivered == last and delayed == 0:
                    return
                outstanding = (
                    f"{group['pending']} pending, delivered up to {delivered} of {last}, "
                    f"{delayed} retries waiting"
                )
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{stream} not settled within {timeout} s: {outstanding}") from None
