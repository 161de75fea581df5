"""Two real processes share one permit: their intervals never overlap, and when the holder is
SIGKILLed the other one gets the permit once the dead holder's lease runs out."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from redis.asyncio import Redis

from sop_llm.ops.gpu_setup import device_keys
from sop_llm.streams.keys import Keys
from tests.conftest import ROOT, terminating, wait_for

SCRIPT = Path(__file__).with_name("holder_proc.py")
LEASE_MS = 500

Interval = tuple[str, float, float | None]


def spawn(
    redis_url: str, keys: Keys, out: str, name: str, rounds: int | None
) -> subprocess.Popen[bytes]:
    spec = {
        "redis_url": redis_url,
        "keys": dataclasses.asdict(device_keys(keys, "host-a", 0)),
        "host": "host-a",
        "out": out,
        "name": name,
        "hold_s": 0.05,
        "rounds": rounds,
        "lease_ms": LEASE_MS,
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(SCRIPT), json.dumps(spec)], cwd=ROOT, env=env)


async def intervals(client: Redis, out: str) -> list[Interval]:
    rows = [json.loads(raw) for raw in await client.lrange(out, 0, -1)]
    return [(str(name), float(start), end) for name, start, end in rows]


async def test_two_processes_never_overlap_and_a_killed_holder_is_outlived(
    client: Redis, keys: Keys, redis_url: str
) -> None:
    out = keys.gpu("host-a", 0) + ":test-intervals"  # the namespace fixture removes it

    async def count(name: str) -> int:
        return sum(1 for n, _, _ in await intervals(client, out) if n == name)

    # "b" loops; "a" joins, takes a few turns, then holds the permit until it is killed
    with terminating(spawn(redis_url, keys, out, "b", rounds=None)) as b:
        await wait_for(lambda: count("b"), timeout=20)
        with terminating(spawn(redis_url, keys, out, "a", rounds=4)) as a:

            async def a_holds_forever() -> bool:
                seen = await intervals(client, out)
                return any(n == "a" and end is None for n, _, end in seen)

            await wait_for(a_holds_forever, timeout=20)
            a.send_signal(signal.SIGKILL)
            a.wait(10)
            killed_at = time.time()

        async def b_after_kill() -> list[Interval]:
            seen = await intervals(client, out)
            return [iv for iv in seen if iv[0] == "b" and iv[1] > killed_at]

        [after, *_] = await wait_for(b_after_kill, timeout=10)
        assert b.poll() is None

    seen = await intervals(client, out)
    # the dead holder's permit came free only when its lease (renewed every third) ran out
    assert LEASE_MS / 3000 < after[1] - killed_at < LEASE_MS / 1000 + 1.5
    spans = sorted((start, killed_at if end is None else end, n) for n, start, end in seen)
    for (_, prev_end, prev), (start, _, name) in itertools.pairwise(spans):
        assert start >= prev_end, f"{name} started while {prev} held the permit"
    assert sum(1 for n, _, _ in seen if n == "a") == 5
    # one permit, equal priorities: they took turns in arrival order
    assert sum(1 for n, _, end in seen if n == "b" and end is not None and end < killed_at) >= 4
