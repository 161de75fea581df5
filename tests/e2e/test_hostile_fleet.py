"""Hostile input against two real worker processes: good tasks interleaved with every class of
bad entry (and generated garbage), 50 MB entries among them.

Every good task completes exactly once within a stated bound; every bad entry ends with exactly
one outcome, under the producer's id where it had a readable one (a malformed entry carrying the
id of another entry's task gets only a dead letter of its own); the workers stay alive, hold no
slot at the end, and their memory stays bounded.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import signal
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from sop_llm.providers.echo import EchoProvider
from sop_llm.providers.registry import ModelRegistry
from sop_llm.schemas.result import DeadLetter, TaskState
from sop_llm.streams.entries import text
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.conftest import spawn_cli, terminating, wait_for, worker_env
from tests.harness import results, running_worker, stream_entries
from tests.waiting import wait_settled

Fields = dict[FieldT, EncodableT]

# (name, fields, the id its outcome must carry; None: it has none, so the derived id)
NAMED: list[tuple[str, Fields, str | None]] = [
    ("wrong type", {"type": "task.nope", "data": '{"task_id":"h-type","model":"echo"}'}, "h-type"),
    ("no data", {"type": "task.submitted"}, None),
    ("not json", {"type": "task.submitted", "data": '{"task_id":"h-json", oops'}, "h-json"),
    ("not an object", {"type": "task.submitted", "data": "[1, 2, 3]"}, None),
    (
        "bad utf-8",
        {"type": "task.submitted", "data": b'{"task_id":"h-utf8","model":"echo","prompt":"\xff"}'},
        "h-utf8",
    ),
    (
        "deep nesting",
        {
            "type": "task.submitted",
            "data": '{"task_id":"h-deep","model":"echo","metadata":'
            + "[" * 100_000
            + "]" * 100_000
            + "}",
        },
        "h-deep",
    ),
    (
        "unknown model",
        {"type": "task.submitted", "data": '{"task_id":"h-model","model":"nope","prompt":"x"}'},
        "h-model",
    ),
    (
        "no prompt",
        {"type": "task.submitted", "data": '{"task_id":"h-noprompt","model":"echo"}'},
        "h-noprompt",
    ),
    (
        "key of another family",
        {
            "type": "task.submitted",
            "data": '{"task_id":"h-x:tokens","model":"echo","prompt":"a b"}',
        },
        "h-x:tokens",
    ),
    (
        "bad webhook type",
        {
            "type": "task.submitted",
            "data": '{"task_id":"h-hook","model":"echo","prompt":"a","webhook_url":7}',
        },
        "h-hook",
    ),
    (
        "extra field",
        {
            "type": "task.submitted",
            "data": '{"task_id":"h-extra","model":"echo","prompt":"a","bogus":1}',
        },
        "h-extra",
    ),
]

# bounds stated by this suite
GOOD_TASKS_WITHIN_S = 60
WORKER_RSS_MAX_MB = 400


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # the peak resident size over the process's life
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
async def test_two_workers_under_hostile_input(
    client: Redis, keys: Keys, redis_url: str, tmp_path: Path
) -> None:
    env = worker_env(
        redis_url, keys.namespace, echo_tokens_per_s=0, block_ms=200, reclaim_interval_ms=200,
        lease_ttl_ms=2000, worker_slots=8,
    )  # fmt: skip
    stream = keys.tasks("default", "normal")
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    w1 = spawn_cli(["worker"], {**env, "SOP_WORKER_NAME": "w1"}, tmp_path / "w1.log")
    w2 = spawn_cli(["worker"], {**env, "SOP_WORKER_NAME": "w2"}, tmp_path / "w2.log")
    with terminating(w1), terminating(w2):
        # a running task whose id malformed entries will carry
        running = await p.submit("echo", "held", max_tokens=1)
        good: list[str] = []
        rng = random.Random(24)
        huge = b"x" * (50 << 20)
        derived: list[str] = []
        for i, (_, fields, task_id) in enumerate(NAMED * 3):
            good += [await p.submit("echo", f"good {i} {j}", max_tokens=3) for j in range(5)]
            entry_id = text(await client.xadd(stream, fields))
            if task_id is None:
                derived.append(keys.derived_task_id("default", "normal", entry_id))
            if i % 11 == 0:  # 50 MB entries among the others (three in all)
                await client.xadd(stream, {"type": "task.submitted", "data": huge})
            if rng.random() < 0.3:  # a malformed duplicate of a task that exists
                await client.xadd(
                    stream, {"type": "task.submitted", "data": json.dumps({"task_id": running})}
                )
        started = time.monotonic()
        good_results = [await p.wait(t, timeout=GOOD_TASKS_WITHIN_S) for t in good]
        elapsed = time.monotonic() - started
        await wait_settled(client, keys, stream, timeout=60)
        assert w1.poll() is None and w2.poll() is None  # alive
        peak = max(_rss_mb(w1.pid), _rss_mb(w2.pid))
        for w in (w1, w2):
            w.send_signal(signal.SIGTERM)
        for w in (w1, w2):
            assert await asyncio.to_thread(w.wait, 30) == 0
    assert all(r.state == TaskState.COMPLETED for r in good_results)
    assert elapsed < GOOD_TASKS_WITHIN_S
    done = await results(client, keys)
    counts = collections.Counter(r.task_id for r in done)
    assert all(counts[t] == 1 for t in [*good, running])  # exactly once
    assert counts[running] == 1
    for name, _, task_id in NAMED:
        if task_id is not None:
            # the same id published three times: one outcome, the later two fenced off
            assert counts[task_id] == 1, name
    assert all(counts[t] == 1 for t in derived)
    dead = [
        DeadLetter.model_validate_json(e.data or b"")
        for e in await stream_entries(client, keys.dead)
    ]
    assert sum(1 for d in dead if "__oversize" in d.fields) == 3
    pending = await client.xpending(stream, "workers")
    assert pending["pending"] == 0  # no slot held, nothing parked
    assert peak < WORKER_RSS_MAX_MB, f"a worker peaked at {peak:.0f} MB"


_field = st.one_of(st.binary(max_size=64), st.text(max_size=64))
_garbage = st.one_of(
    st.dictionaries(
        st.sampled_from(["type", "data", "traceparent", "x"]), _field, min_size=1, max_size=4
    ),
    st.builds(
        lambda extra: {"type": "task.submitted", "data": json.dumps({"task_id": "g-id", **extra})},
        st.dictionaries(
            st.sampled_from(["model", "prompt", "max_tokens", "temperature", "stream", "messages",
                             "deadline", "timeout_s", "metadata", "reply_to", "v"]),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16),
                lambda inner: (
                    st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3)
                ),
                max_leaves=6,
            ),
            max_size=5,
        ),
    ),
)  # fmt: skip


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(garbage=st.lists(_garbage, min_size=5, max_size=25))
def test_generated_garbage_beside_good_tasks(
    garbage: list[Fields], redis_url: str, namespace: str
) -> None:
    """Whatever the entries, each good task ends once, completed, and each garbage entry ends
    once; the worker stays alive and holds nothing at the end."""

    async def run() -> None:
        keys = Keys(f"{namespace}-{random.getrandbits(32):08x}")
        client = Redis.from_url(redis_url)
        try:
            registry = ModelRegistry()
            registry.register("echo", EchoProvider())
            p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
            stream = keys.tasks("default", "normal")
            async with running_worker(client, keys, registry=registry, slots=4) as worker:
                good, derived = [], []
                for fields in garbage:
                    good.append(await p.submit("echo", "good", max_tokens=2))
                    entry_id = text(await client.xadd(stream, fields))
                    if "g-id" not in str(fields.get("data", "")):
                        derived.append(keys.derived_task_id("default", "normal", entry_id))
                for t in good:
                    assert (await p.wait(t, timeout=20)).state == TaskState.COMPLETED
                await wait_settled(client, keys, stream)
                await wait_for(lambda: worker.inflight == 0, 5)
            done = await results(client, keys)
            counts = collections.Counter(r.task_id for r in done)
            assert all(counts[t] == 1 for t in good)
            # an entry with no readable id ends once under its derived id; the ones sharing the
            # id "g-id" end that task once (the later ones are fenced off or found it done)
            assert all(counts[t] == 1 for t in derived)
            assert counts["g-id"] <= 1
            assert (await client.xpending(stream, "workers"))["pending"] == 0
        finally:
            names = [k async for k in client.scan_iter(match=keys.all_pattern)]
            if names:
                await client.delete(*names)
            await client.aclose()

    asyncio.run(run())
