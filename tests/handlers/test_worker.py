"""The task worker against a real Redis: priority, aging, slots, exactly one outcome."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis

from sop_llm.schemas.result import DeadLetter, TaskState
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from sop_llm.streams.status import read_status
from tests.conftest import wait_for
from tests.harness import results, running_worker, stream_entries, wait_results, xadd_task


def producer(client: Redis, keys: Keys) -> Producer:
    return Producer(ProducerConfig(namespace=keys.namespace), client=client)


async def test_strict_priority_with_one_slot(client: Redis, keys: Keys) -> None:
    p = producer(client, keys)
    async with running_worker(client, keys, slots=1, tokens_per_s=100, aging_ms=0):
        blocker = await p.submit("echo", "hold the slot", max_tokens=40)  # ~0.4 s
        await wait_for(lambda: _state(client, keys, blocker, "running"), 5)
        order: dict[str, str] = {}
        for prio in ("low", "normal", "high"):
            for i in range(10):
                order[await p.submit("echo", f"{prio} {i}", priority=prio, max_tokens=1)] = prio
        done = await wait_results(client, keys, 31, timeout=20)
    assert done[0].task_id == blocker
    ran = [order[r.task_id] for r in done[1:]]
    assert ran == ["high"] * 10 + ["normal"] * 10 + ["low"] * 10


async def test_aging_rule_lets_an_old_low_task_through(client: Redis, keys: Keys) -> None:
    p = producer(client, keys)
    async with running_worker(
        client, keys, slots=1, tokens_per_s=100, aging_ms=300, aging_check_ms=50
    ):
        low = await p.submit("echo", "old low task", priority="low", max_tokens=1)
        highs = [
            await p.submit("echo", f"high {i}", priority="high", max_tokens=5) for i in range(40)
        ]
        done = await wait_results(client, keys, 41, timeout=30)
    ids = [r.task_id for r in done]
    # 40 high tasks take ~2 s; the low one ages past 300 ms and goes well before the last high
    assert ids.index(low) < 30, ids.index(low)
    assert set(ids) == {low, *highs}


async def test_without_aging_low_waits_for_all_high(client: Redis, keys: Keys) -> None:
    p = producer(client, keys)
    async with running_worker(client, keys, slots=1, tokens_per_s=100, aging_ms=0):
        blocker = await p.submit("echo", "hold", max_tokens=20)
        await wait_for(lambda: _state(client, keys, blocker, "running"), 5)
        low = await p.submit("echo", "low", priority="low", max_tokens=1)
        for i in range(10):
            await p.submit("echo", f"high {i}", priority="high", max_tokens=1)
        done = await wait_results(client, keys, 12, timeout=20)
    assert done[-1].task_id == low


async def test_busy_worker_reads_nothing(client: Redis, keys: Keys) -> None:
    p = producer(client, keys)
    for i in range(12):
        await p.submit("echo", f"task {i}", max_tokens=6)
    peak = 0
    async with running_worker(client, keys, slots=2, tokens_per_s=40, consumer="busy"):
        async with asyncio.timeout(20):
            while await client.xlen(keys.results) < 12:
                pending = await client.xpending(keys.tasks("default", "normal"), "workers")
                peak = max(peak, pending["pending"])
                await asyncio.sleep(0.005)
    assert 1 <= peak <= 2


async def test_malformed_plain_xadd_events_are_answered_and_worker_goes_on(
    client: Redis, keys: Keys
) -> None:
    big = "x" * 2000
    bad = {
        "not-json": ("{nope", "event: Invalid JSON"),
        "no-model": (json.dumps({"task_id": "no-model", "prompt": "x"}), "model: Field required"),
        "unknown-field": (
            json.dumps(
                {"task_id": "unknown-field", "model": "echo", "prompt": "x", "colour": "red"}
            ),
            "colour: Extra inputs are not permitted",
        ),
        "too-big": (
            json.dumps({"task_id": "too-big", "model": "echo", "prompt": big}),
            "over the limit of 1000 bytes",
        ),
        "unknown-model": (
            json.dumps({"task_id": "unknown-model", "model": "gpt-9", "prompt": "x"}),
            "'gpt-9' is not registered",
        ),
    }
    entry_ids = {name: await xadd_task(client, keys, data) for name, (data, _) in bad.items()}
    await xadd_task(client, keys, {"task_id": "good-1", "model": "echo", "prompt": "fine"})
    wrong_type = await xadd_task(client, keys, {"model": "echo", "prompt": "x"}, type_="task.oops")
    async with running_worker(client, keys, max_prompt_bytes=1000):
        done = {r.task_id: r for r in await wait_results(client, keys, 7)}
        await xadd_task(
            client, keys, {"task_id": "good-2", "model": "echo", "prompt": "still alive"}
        )
        await wait_results(client, keys, 8)
    assert (await read_status(client, keys, "good-2")).state == TaskState.COMPLETED  # type: ignore[union-attr]
    assert done["good-1"].state == TaskState.COMPLETED
    not_json_id = f"default.normal.{entry_ids['not-json']}"
    expected = {
        **{k: v for k, (_, v) in bad.items() if k != "not-json"},
        not_json_id: bad["not-json"][1],
    }
    expected[f"default.normal.{wrong_type}"] = "type: expected 'task.submitted'"
    for task_id, message in expected.items():
        result = done[task_id]
        assert result.state == TaskState.FAILED, task_id
        assert result.error is not None
        code = "model_not_found" if task_id == "unknown-model" else "invalid_event"
        assert result.error.code == code, task_id
        assert message in result.error.message, (task_id, result.error.message)
    dead = [
        DeadLetter.model_validate_json(e.data or b"")
        for e in await stream_entries(client, keys.dead)
    ]
    assert {d.task_id for d in dead} == set(expected)
    for d in dead:
        assert d.source_stream == keys.tasks("default", "normal")
        assert d.fields["type"] in ("task.submitted", "task.oops")
        assert d.message
    raw = next(d for d in dead if d.task_id == not_json_id)
    assert raw.fields["data"] == "{nope"
    assert raw.entry_id == entry_ids["not-json"]
    # nothing left pending
    assert (await client.xpending(keys.tasks("default", "normal"), "workers"))["pending"] == 0


async def test_entry_that_is_not_utf8_is_dead_lettered(client: Redis, keys: Keys) -> None:
    entry_id = await xadd_task(client, keys, b"\xff\xfe\x00garbage")
    async with running_worker(client, keys):
        [result] = await wait_results(client, keys, 1)
    assert result.task_id == f"default.normal.{entry_id}"
    assert result.error is not None and result.error.code == "invalid_event"
    [dead] = await stream_entries(client, keys.dead)
    assert DeadLetter.model_validate_json(dead.data or b"").fields["data"].startswith("base64:")


async def test_plain_xadd_duplicates_run_once(client: Redis, keys: Keys) -> None:
    body = {"model": "echo", "prompt": "pay invoice 7", "idempotency_key": "inv-7"}
    first = await xadd_task(client, keys, body)
    second = await xadd_task(client, keys, body)
    third = await xadd_task(client, keys, {**body, "prompt": "something else"})
    async with running_worker(client, keys, slots=1):
        await wait_results(client, keys, 2)
        await wait_for(lambda: _pending_zero(client, keys), 5)
    done = await results(client, keys)
    assert len(done) == 2
    ok = next(r for r in done if r.state == TaskState.COMPLETED)
    assert ok.task_id == f"default.normal.{first}"
    conflict = next(r for r in done if r.state == TaskState.FAILED)
    assert conflict.task_id == f"default.normal.{third}"
    assert conflict.error is not None and conflict.error.code == "idempotency_conflict"
    alias = await read_status(client, keys, f"default.normal.{second}")
    assert (
        alias is not None
        and alias.duplicate_of == ok.task_id
        and alias.state == TaskState.COMPLETED
    )


async def test_same_task_id_published_twice_runs_once(client: Redis, keys: Keys) -> None:
    body = {"task_id": "twice", "model": "echo", "prompt": "once please"}
    await xadd_task(client, keys, body)
    await xadd_task(client, keys, body, partition="high")
    async with running_worker(client, keys, slots=1):
        await wait_results(client, keys, 1)
        await wait_for(lambda: _pending_zero(client, keys, "high"), 5)
        await wait_for(lambda: _pending_zero(client, keys), 5)
    assert [r.task_id for r in await results(client, keys)] == ["twice"]


async def test_deadline_past_expires_without_running(client: Redis, keys: Keys) -> None:
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    await xadd_task(
        client, keys, {"task_id": "late", "model": "echo", "prompt": "x", "deadline": past}
    )
    async with running_worker(client, keys, tokens_per_s=20):
        [result] = await wait_results(client, keys, 1)
        await xadd_task(
            client,
            keys,
            {
                "task_id": "slow",
                "model": "echo",
                "prompt": "a b c",
                "max_tokens": 100,
                "timeout_s": 0.3,
                "stream": True,
            },
        )
        await xadd_task(
            client,
            keys,
            {"task_id": "plain", "model": "echo", "prompt": "a b c", "max_tokens": 100,
             "timeout_s": 0.3},
        )  # fmt: skip
        by_id = {r.task_id: r for r in await wait_results(client, keys, 3)}
        slow, plain = by_id["slow"], by_id["plain"]
    assert (
        result.state == TaskState.EXPIRED
        and result.finish_reason == "deadline"
        and result.text == ""
    )
    assert slow.state == TaskState.EXPIRED and slow.finish_reason == "deadline"
    # a streaming task stopped at the deadline keeps what was generated so far
    assert slow.text and 1 <= len(slow.text.split()) < 100
    # one that does not stream was one plain request: no partial text, but its usage
    assert plain.state == TaskState.EXPIRED and plain.text == ""
    assert plain.usage is not None and 1 <= (plain.usage.output_tokens or 0) < 100


async def test_metadata_and_timings_pass_through(client: Redis, keys: Keys) -> None:
    p = producer(client, keys)
    task_id = await p.submit("echo", "a b", max_tokens=3, metadata={"order": 7, "tags": ["x"]})
    async with running_worker(client, keys, consumer="meta-worker"):
        result = await p.wait(task_id, timeout=5)
    assert result.metadata == {"order": 7, "tags": ["x"]}
    assert result.text == "a b a" and result.usage is not None and result.usage.output_tokens == 3
    assert result.worker == "meta-worker" and result.attempts == 1
    record = await p.status(task_id)
    assert record is not None and record.result == result
    ttl = await client.ttl(keys.task(task_id))
    assert 86_000 < ttl <= 86_400


async def _state(client: Redis, keys: Keys, task_id: str, state: str) -> bool:
    return (await client.hget(keys.task(task_id), "state")) == state.encode()


async def _pending_zero(client: Redis, keys: Keys, partition: str = "normal") -> bool:
    return bool(
        (await client.xpending(keys.tasks("default", partition), "workers"))["pending"] == 0
    )
