"""Driving a sop-llm namespace from the harness (project venv): publish ``task.submitted``
entries the way any service would (plain XADDs), wait for their results, delete the namespace
afterwards (SCAN + UNLINK of its keys only; never FLUSHALL)."""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from redis.typing import EncodableT, FieldT

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peers.common import payload  # noqa: E402
from bench.sampling import commandstats, pct, per_task, stats_delta  # noqa: E402
from sop_llm.streams.keys import Keys  # noqa: E402

Fields = dict[FieldT, EncodableT]  # a stream entry, as redis-py types XADD's argument

POLL_S = 0.005


def task_fields(task_id: str) -> Fields:
    """One ``task.submitted`` entry: the ~530-byte echo task every system runs."""
    return {"type": "task.submitted", "data": payload(task_id)}


def code_fingerprint() -> str:
    """Short digest of the production sources under test (they change between commits)."""
    h = hashlib.sha256()
    for pkg in ("schemas", "streams", "providers", "gpu", "handlers", "ops"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def cleanup(r: redis.Redis, keys: Keys) -> int:
    """Delete every key of the namespace (SCAN + UNLINK); nothing else is touched."""
    n = 0
    batch: list[bytes] = []
    for key in r.scan_iter(match=keys.all_pattern, count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            n += r.unlink(*batch)
            batch = []
    if batch:
        n += r.unlink(*batch)
    return n


def publish_backlog(r: redis.Redis, keys: Keys, n: int, prefix: str) -> None:
    """``n`` tasks (ids ``{prefix}.{i}``) in pipelines of 1,000 XADDs."""
    stream = keys.tasks("default", "normal")
    for start in range(0, n, 1000):
        pipe = r.pipeline(transaction=False)
        for i in range(start, min(n, start + 1000)):
            pipe.xadd(stream, task_fields(f"{prefix}.{i}"))
        pipe.execute()


def wait_results(
    r: redis.Redis,
    keys: Keys,
    n: int,
    timeout: float,
    on_poll: Callable[[int], None] | None = None,
) -> int:
    """Poll XLEN of the results stream until it holds ``n`` entries; returns the XLEN count."""
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        have = r.xlen(keys.results)
        polls += 1
        if on_poll is not None:
            on_poll(have)
        if have >= n:
            return polls
        if time.monotonic() > deadline:
            raise TimeoutError(f"{have} of {n} results after {timeout} s")
        time.sleep(POLL_S)


def last_result_id(r: redis.Redis, keys: Keys) -> bytes:
    newest: Any = r.xrevrange(keys.results, count=1)
    return newest[0][0] if newest else b"0-0"


def publish_and_wait(
    r: redis.Redis, keys: Keys, task_id: str, last: bytes
) -> tuple[float, bytes, int]:
    """Publish one task (plain XADD) and block on the results stream, read from ``last`` on,
    until its result: (seconds, the newest results id seen, XREADs made)."""
    needle = f'"task_id":"{task_id}"'.encode()
    fields = task_fields(task_id)
    t0 = time.perf_counter()
    r.xadd(keys.tasks("default", "normal"), fields)
    reads = 0
    while True:
        reply: Any = r.xread({keys.results: last}, count=16, block=5000)
        reads += 1
        if not reply:
            raise TimeoutError(f"no result for {task_id} within 5 s")
        done = False
        for eid, entry in reply[0][1]:
            last = eid
            done = done or needle in entry[b"data"]
        if done:
            return time.perf_counter() - t0, last, reads


def serial_latency(r: redis.Redis, keys: Keys, n: int, warmup: int) -> dict[str, Any]:
    """One task at a time: XADD, then blocking XREAD on the results stream until its result;
    p50/p99 client-side and the Redis commands the consumer ran per task."""
    stats0 = commandstats(r)
    last = last_result_id(r, keys)
    ours = {"xadd": warmup + n, "xread": 0, "xrevrange": 1}
    lat: list[float] = []
    for i in range(warmup + n):
        seconds, last, reads = publish_and_wait(r, keys, f"{keys.namespace}.s{i}", last)
        ours["xread"] += reads
        if i >= warmup:
            lat.append(seconds * 1000)
    delta = stats_delta(stats0, commandstats(r), ours)
    return {
        "n": n,
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "max_ms": max(lat),
        "redis_cmds_per_task": per_task(delta, warmup + n),
    }
