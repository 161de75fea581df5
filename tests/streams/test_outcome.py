"""The atomic terminal write and reclaiming, straight against Redis."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

from sop_llm.schemas.errors import ErrorCode
from sop_llm.schemas.result import DeadLetter, TaskResult, TaskState, WebhookJob
from sop_llm.streams.entries import Entry, entries_from_read
from sop_llm.streams.keys import TASK_GROUP, Keys
from sop_llm.streams.leases import Lease, Reclaimer
from sop_llm.streams.outcome import Finish, Outcomes, Start
from sop_llm.streams.topology import ensure_groups
from tests.harness import stream_entries


async def _one_entry(client: Redis, keys: Keys, consumer: str) -> Entry:
    stream = keys.tasks("default", "normal")
    await ensure_groups(client, [stream], TASK_GROUP)
    await client.xadd(stream, {"type": "task.submitted", "data": '{"model":"echo","prompt":"x"}'})
    [entry] = entries_from_read(
        await client.xreadgroup(TASK_GROUP, consumer, {stream: ">"}, count=1)
    )
    return entry


def _result(task_id: str, worker: str, attempts: int = 1) -> TaskResult:
    return TaskResult(
        task_id=task_id, state=TaskState.COMPLETED, text=worker, finished_at=1, worker=worker,
        attempts=attempts,
    )  # fmt: skip


async def test_two_racing_attempts_write_one_result(client: Redis, keys: Keys) -> None:
    entry = await _one_entry(client, keys, "a")
    a = Outcomes(client=client, keys=keys, worker="a", status_ttl_s=60, max_attempts=3)
    b = Outcomes(client=client, keys=keys, worker="b", status_ttl_s=60, max_attempts=3)
    [ra] = await a.begin([Start(entry=entry, task_id="t1", model="echo")], now_ms=1)
    [rb] = await b.begin([Start(entry=entry, task_id="t1", model="echo")], now_ms=2)
    assert (ra.verdict, ra.attempts, rb.verdict, rb.attempts) == ("run", 1, "run", 2)
    job = WebhookJob(
        delivery_id="d1",
        task_id="t1",
        url="https://x.test/h",
        event="task.completed",
        payload=_result("t1", "a"),
        created_at=1,
    )
    # the first attempt (the frozen worker, say) finishes first: it wins
    won_a = await a.finish(
        Finish(entry=entry, result=_result("t1", "a", 1), webhook=job, reply_to="svc")
    )
    won_b = await b.finish(
        Finish(entry=entry, result=_result("t1", "b", 2), webhook=job, reply_to="svc")
    )
    assert (won_a, won_b) == (1, 0)
    # the status record names the attempt that won, as its one result does
    status = await client.hmget(keys.task("t1"), ["worker", "attempts"])
    assert status == [b"a", b"1"]
    [written] = await stream_entries(client, keys.results)
    assert (TaskResult.model_validate_json(written.data or b"").worker, status[1]) == ("a", b"1")
    assert await client.xlen(keys.results) == 1
    assert await client.xlen(keys.results_for("svc")) == 1
    assert await client.xlen(keys.webhooks) == 1
    assert (await client.xpending(entry.stream, TASK_GROUP))["pending"] == 0
    # a late third attempt is told the task is done and acks without writing
    [rc] = await b.begin([Start(entry=entry, task_id="t1", model="echo")], now_ms=3)
    assert rc.verdict == "done" and rc.other == "completed"
    assert 0 < await client.ttl(keys.task("t1")) <= 60


TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_a_batch_of_finishes_writes_each_one_with_its_own_fields(
    client: Redis, keys: Keys
) -> None:
    """One FINISH_MANY call: a plain finish, one with a dead letter, trace context and a webhook,
    one whose expected state does not hold, and one for a task already over."""
    entries = [await _one_entry(client, keys, "a") for _ in range(4)]
    o = Outcomes(client=client, keys=keys, worker="a", status_ttl_s=60, max_attempts=3)
    starts = [Start(entry=e, task_id=f"b{i}", model="echo") for i, e in enumerate(entries)]
    await o.begin(starts[:2], now_ms=1)
    await client.hset(keys.task("b3"), mapping={"state": "completed"})
    dead = DeadLetter(
        source_stream=entries[1].stream, entry_id=entries[1].entry_id, task_id="b1",
        reason=ErrorCode.INVALID_EVENT, message="bad", fields={"type": "task.submitted"}, dead_at=1,
    )  # fmt: skip
    job = WebhookJob(
        delivery_id="d9", task_id="b1", url="https://x.test/h", event="task.failed",
        payload=_result("b1", "a"), created_at=1,
    )  # fmt: skip
    failed = _result("b1", "a").model_copy(update={"state": TaskState.FAILED})
    written = await asyncio.gather(
        o.finish(Finish(entry=entries[0], result=_result("b0", "a"))),
        o.finish(Finish(entry=entries[1], result=failed, dead=dead, webhook=job, traceparent=TP)),
        o.finish(Finish(entry=entries[2], result=_result("b2", "a"), expect_state="queued")),
        o.finish(Finish(entry=entries[3], result=_result("b3", "a"), dead=dead)),
    )
    assert list(written) == [1, 1, -1, 0]
    results: Any = await client.xrange(keys.results)
    assert [(f[b"type"], f.get(b"traceparent")) for _, f in results] == [
        (b"task.completed", None),
        (b"task.failed", TP.encode()),
    ]
    assert TaskResult.model_validate_json(results[1][1][b"data"]).state == TaskState.FAILED
    hooks: Any = await client.xrange(keys.webhooks)
    [(_, hook)] = hooks
    assert (hook[b"type"], hook[b"traceparent"]) == (b"webhook.delivery", TP.encode())
    assert WebhookJob.model_validate_json(hook[b"data"]).delivery_id == "d9"
    # b1's dead letter, and b3's (its entry was still pending, though the task was over)
    letters: Any = await client.xrange(keys.dead)
    assert [f.get(b"traceparent") for _, f in letters] == [TP.encode(), None]
    assert {DeadLetter.model_validate_json(f[b"data"]).task_id for _, f in letters} == {"b1"}
    assert await client.hget(keys.task("b1"), "webhook_state") == b"pending"
    assert not await client.exists(keys.task("b2"))  # expected state did not hold: nothing
    pending: Any = await client.xpending_range(entries[0].stream, TASK_GROUP, "-", "+", 10)
    assert [p["message_id"].decode() for p in pending] == [entries[2].entry_id]


async def test_attempt_limit_backstop(client: Redis, keys: Keys) -> None:
    entry = await _one_entry(client, keys, "a")
    o = Outcomes(client=client, keys=keys, worker="a", status_ttl_s=60, max_attempts=2)
    verdicts = [
        (await o.begin([Start(entry=entry, task_id="t2", model="echo")], now_ms=1))[0].verdict
        for _ in range(3)
    ]
    assert verdicts == ["run", "run", "exhausted"]


async def test_reclaim_only_from_expired_leases(client: Redis, keys: Keys) -> None:
    entry = await _one_entry(client, keys, "alive")
    alive = Lease(client=client, keys=keys, consumer="alive", ttl_ms=5_000, info={})
    await alive.renew()
    reclaimer = Reclaimer(client=client, keys=keys, streams=[entry.stream], consumer="rescuer")
    await asyncio.sleep(0.3)  # idle for longer than the claim guard: idleness alone must not matter
    assert await reclaimer.reclaim(10) == []
    await alive.release()  # the owner's lease is gone: now it may be claimed
    [claimed] = await reclaimer.reclaim(10)
    assert claimed.entry_id == entry.entry_id and claimed.fields == entry.fields
    assert await reclaimer.reclaim(10) == []  # the next pass prunes the dead, now empty, consumer
    consumers = {
        c["name"]: c["pending"] for c in await client.xinfo_consumers(entry.stream, TASK_GROUP)
    }
    assert consumers == {b"rescuer": 1}


async def test_reclaim_respects_free_slots(client: Redis, keys: Keys) -> None:
    stream = keys.tasks("default", "normal")
    await ensure_groups(client, [stream], TASK_GROUP)
    for _ in range(5):
        await client.xadd(stream, {"type": "task.submitted", "data": "{}"})
    await client.xreadgroup(TASK_GROUP, "dead", {stream: ">"}, count=5)
    await asyncio.sleep(0.25)
    reclaimer = Reclaimer(client=client, keys=keys, streams=[stream], consumer="r")
    assert len(await reclaimer.reclaim(2)) == 2
    pending = await client.xpending(stream, TASK_GROUP)
    assert {c["name"]: c["pending"] for c in pending["consumers"]} == {b"dead": 3, b"r": 2}


async def test_own_orphans_are_adopted_but_running_entries_are_not(
    client: Redis, keys: Keys
) -> None:
    stream = keys.tasks("default", "normal")
    await ensure_groups(client, [stream], TASK_GROUP)
    for _ in range(3):
        await client.xadd(stream, {"type": "task.submitted", "data": "{}"})
    # delivered to "me" (the reply lost on the way, say); one of them does run here
    delivered = entries_from_read(await client.xreadgroup(TASK_GROUP, "me", {stream: ">"}, count=3))
    running = {(stream, delivered[0].entry_id)}
    reclaimer = Reclaimer(client=client, keys=keys, streams=[stream], consumer="me")
    assert await reclaimer.orphans(10, running, min_idle_ms=60_000) == []  # not idle long enough
    await asyncio.sleep(0.25)
    adopted = await reclaimer.orphans(10, running, min_idle_ms=200)
    assert sorted(e.entry_id for e in adopted) == sorted(e.entry_id for e in delivered[1:])
    # adopting resets the idle time: a second pass right after takes nothing
    assert await reclaimer.orphans(10, running, min_idle_ms=200) == []
