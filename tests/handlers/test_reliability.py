"""Retries and dead letters by error class, cancellation, back-pressure, requeue."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from redis.asyncio import Redis

from sop_llm.handlers.policy import RetryPolicy
from sop_llm.providers.base import ProviderError
from sop_llm.providers.registry import ModelRegistry
from sop_llm.schemas.errors import BacklogFullError, ErrorCode
from sop_llm.schemas.result import DeadLetter, TaskState
from sop_llm.streams.control import CancelOutcome
from sop_llm.streams.dead import all_dead, requeue
from sop_llm.streams.errors import INCIDENTS
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from sop_llm.streams.status import read_status
from tests.conftest import RedisServer, wait_for
from tests.fakes import ScriptedProvider
from tests.harness import results, running_worker, stream_entries, wait_results, xadd_task

FAST_RETRY: dict[str, Any] = {"retry_poll_ms": 20}


def registry_with(provider: ScriptedProvider) -> ModelRegistry:
    registry = ModelRegistry()
    registry.register("m", provider)
    return registry


def producer(client: Redis, keys: Keys, **kw: int) -> Producer:
    return Producer(ProducerConfig(namespace=keys.namespace, **kw), client=client)  # type: ignore[arg-type]


def limited(retry_after: float | None = None) -> ProviderError:
    return ProviderError(
        "slow down", code=ErrorCode.RATE_LIMITED, retryable=True, retry_after=retry_after
    )


async def test_retry_after_is_honoured_and_attempts_recorded(client: Redis, keys: Keys) -> None:
    provider = ScriptedProvider([limited(0.4), limited(0.4), "third time lucky"])
    p = producer(client, keys)
    task_id = await p.submit("m", "x")
    async with running_worker(client, keys, registry=registry_with(provider), **FAST_RETRY):
        result = await p.wait(task_id, timeout=10)
    assert result.state == TaskState.COMPLETED and result.text == "third time lucky"
    assert result.attempts == 3
    gaps = [b - a for a, b in zip(provider.calls, provider.calls[1:], strict=False)]
    assert all(0.35 <= g < 1.5 for g in gaps), gaps
    raw = await client.hget(keys.task(task_id), "errors")
    assert raw is not None
    assert [e["code"] for e in json.loads(raw)] == ["rate_limited", "rate_limited"]
    assert len(await results(client, keys)) == 1


async def test_exhausted_retries_end_failed_and_dead_lettered(client: Redis, keys: Keys) -> None:
    provider = ScriptedProvider(
        [ProviderError("upstream 503", code=ErrorCode.OVERLOADED, retryable=True, retry_after=0.05)]
    )
    entry_id = await xadd_task(
        client, keys, {"task_id": "doomed", "model": "m", "prompt": "x", "max_attempts": 2}
    )
    async with running_worker(client, keys, registry=registry_with(provider), **FAST_RETRY):
        [result] = await wait_results(client, keys, 1)
    assert result.state == TaskState.FAILED and result.attempts == 2
    assert result.error is not None and result.error.code == ErrorCode.MAX_ATTEMPTS
    assert "upstream 503" in result.error.message
    [dead] = await all_dead(client, keys)
    assert dead.letter.task_id == "doomed" and dead.letter.reason == ErrorCode.MAX_ATTEMPTS
    assert dead.letter.source_stream == keys.tasks("default", "normal")
    assert dead.letter.entry_id != entry_id  # the retry ran from a re-published entry
    assert [e.code for e in dead.letter.errors] == ["overloaded", "max_attempts"]
    assert len(provider.calls) == 2


@pytest.mark.parametrize(
    ("error", "dead_lettered"),
    [
        (ProviderError("bad prompt", code=ErrorCode.BAD_REQUEST), False),
        (ProviderError("context too long", code=ErrorCode.CONTEXT_LENGTH), False),
        (ProviderError("bad key", code=ErrorCode.AUTH), True),
    ],
)
async def test_final_errors_are_not_retried(
    client: Redis, keys: Keys, error: ProviderError, dead_lettered: bool
) -> None:
    provider = ScriptedProvider([error, "never"])
    p = producer(client, keys)
    task_id = await p.submit("m", "x")
    async with running_worker(client, keys, registry=registry_with(provider), **FAST_RETRY):
        result = await p.wait(task_id, timeout=5)
    assert result.state == TaskState.FAILED and result.error is not None
    assert result.error.code == error.code and result.attempts == 1
    assert len(provider.calls) == 1
    assert (await client.xlen(keys.dead) == 1) is dead_lettered


async def test_unexpected_exception_is_retried_and_worker_goes_on(
    client: Redis, keys: Keys
) -> None:
    provider = ScriptedProvider([RuntimeError("provider bug"), "fine"])
    p = producer(client, keys)
    task_id = await p.submit("m", "x")
    async with running_worker(
        client, keys, registry=registry_with(provider), retry=_fast_policy(), **FAST_RETRY
    ):
        result = await p.wait(task_id, timeout=5)
    assert result.state == TaskState.COMPLETED and result.attempts == 2


async def test_cancel_queued_task_never_runs(client: Redis, keys: Keys) -> None:
    provider = ScriptedProvider(["should not run"])
    p = producer(client, keys)
    task_id = await p.submit("m", "x", reply_to="svc")
    assert await p.cancel(task_id) == CancelOutcome.CANCELLED
    result = await p.wait(task_id, timeout=1)
    assert result.state == TaskState.CANCELLED and result.finish_reason == "cancelled"
    assert await client.xlen(keys.results_for("svc")) == 1
    async with running_worker(client, keys, registry=registry_with(provider)):
        await wait_for(lambda: _nothing_pending(client, keys), 5)
    assert provider.calls == []
    assert len(await results(client, keys)) == 1
    assert await p.cancel(task_id) == CancelOutcome.FINISHED


async def test_cancel_running_task_stops_between_tokens_and_frees_the_slot(
    client: Redis, keys: Keys
) -> None:
    provider = ScriptedProvider([" ".join(["tok"] * 200), "next task"], per_token_s=0.02)
    p = producer(client, keys)
    async with running_worker(client, keys, slots=1, registry=registry_with(provider)):
        long = await p.submit("m", "x", stream=True)
        await _tokens_out(client, keys, long, at_least=5)
        loop = asyncio.get_running_loop()
        asked = loop.time()
        assert await p.cancel(long) == CancelOutcome.REQUESTED
        result = await p.wait(long, timeout=5)
        stopped_after = loop.time() - asked
        follow = await p.submit("m", "y")
        assert (await p.wait(follow, timeout=5)).text == "next task"
    assert result.state == TaskState.CANCELLED and result.finish_reason == "cancelled"
    assert result.text is not None and 0 < len(result.text.split()) < 200
    assert stopped_after < 1.0


async def test_plain_xadd_control_event_cancels(client: Redis, keys: Keys) -> None:
    provider = ScriptedProvider([" ".join(["tok"] * 500)], per_token_s=0.01)
    await xadd_task(client, keys, {"task_id": "c1", "model": "m", "prompt": "x"})
    async with running_worker(client, keys, registry=registry_with(provider)):
        await wait_for(lambda: provider.calls, 5)
        await client.xadd(
            keys.control, {"type": "task.cancel", "data": json.dumps({"task_id": "c1"})}
        )
        [result] = await wait_results(client, keys, 1)
    assert result.state == TaskState.CANCELLED


async def test_cancel_of_unknown_task_does_not_poison_a_later_one(
    client: Redis, keys: Keys
) -> None:
    p = producer(client, keys)
    assert await p.cancel("later-1") == CancelOutcome.UNKNOWN
    await client.xadd(
        keys.control, {"type": "task.cancel", "data": json.dumps({"task_id": "later-1"})}
    )
    async with running_worker(client, keys):
        task_id = await p.submit("echo", "still runs", task_id="later-1")
        assert (await p.wait(task_id, timeout=5)).state == TaskState.COMPLETED


async def test_cancel_while_waiting_for_a_retry(client: Redis, keys: Keys) -> None:
    provider = ScriptedProvider([limited(30.0), "never"])
    p = producer(client, keys)
    task_id = await p.submit("m", "x")
    async with running_worker(client, keys, registry=registry_with(provider), **FAST_RETRY):
        await wait_for(lambda: client.zcard(keys.tasks_delayed), 5)
        assert await p.cancel(task_id) == CancelOutcome.CANCELLED
        assert (await p.wait(task_id, timeout=2)).state == TaskState.CANCELLED
        # make the parked retry due now: the mover must drop it, the task being cancelled
        members: list[bytes] = await client.zrange(keys.tasks_delayed, 0, -1)  # type: ignore[assignment]
        await client.zadd(keys.tasks_delayed, dict.fromkeys(members, 0))
        await wait_for(lambda: _no_retries_waiting(client, keys), 5)
    assert len(provider.calls) == 1 and len(await results(client, keys)) == 1


async def test_backlog_limit_refuses_clearly(client: Redis, keys: Keys) -> None:
    p = producer(client, keys, max_backlog=3)
    for i in range(3):
        await p.submit("echo", f"t{i}")
    with pytest.raises(BacklogFullError, match="at the limit of 3"):
        await p.submit("echo", "one too many")
    await p.submit("echo", "other partition is fine", priority="high")
    async with running_worker(client, keys):
        await wait_results(client, keys, 4)
    await p.submit("echo", "room again")


async def test_requeue_a_dead_letter(client: Redis, keys: Keys) -> None:
    calls = {"n": 0}

    def script(n: int) -> BaseException | str:
        calls["n"] = n
        return ProviderError("bad key", code=ErrorCode.AUTH) if n == 0 else "works now"

    provider = ScriptedProvider(script)
    p = producer(client, keys)
    async with running_worker(client, keys, registry=registry_with(provider)):
        task_id = await p.submit("m", "x")
        assert (await p.wait(task_id, timeout=5)).state == TaskState.FAILED
        [dead] = await all_dead(client, keys)
        await requeue(client, keys, dead)
        await wait_for(lambda: _state_is(client, keys, task_id, TaskState.COMPLETED), 5)
    record = await read_status(client, keys, task_id)
    assert record is not None and record.result is not None and record.result.text == "works now"
    assert await client.xlen(keys.dead) == 0
    assert [r.state for r in await results(client, keys)] == [TaskState.FAILED, TaskState.COMPLETED]
    letters = [
        DeadLetter.model_validate_json(e.data or b"")
        for e in await stream_entries(client, keys.dead)
    ]
    assert letters == []


def _fast_policy() -> RetryPolicy:
    return RetryPolicy(base_s=0.05, max_s=0.1)


async def _tokens_out(client: Redis, keys: Keys, task_id: str, *, at_least: int) -> None:
    """Wait until the task's token stream carries ``at_least`` tokens (one word each here)."""
    seen = 0
    try:
        async with asyncio.timeout(5):
            while True:
                deltas = await stream_entries(client, keys.task_tokens(task_id))
                seen = sum(len(json.loads(e.data or b"{}").get("text", "").split()) for e in deltas)
                if seen >= at_least:
                    return
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"{task_id}: {seen} tokens out, not {at_least}, within 5 s") from None


async def _no_retries_waiting(client: Redis, keys: Keys) -> bool:
    return bool(await client.zcard(keys.tasks_delayed) == 0)


async def _nothing_pending(client: Redis, keys: Keys) -> bool:
    pending = await client.xpending(keys.tasks("default", "normal"), "workers")
    info = await client.xinfo_groups(keys.tasks("default", "normal"))
    return bool(pending["pending"] == 0 and info and info[0]["lag"] == 0)


async def _state_is(client: Redis, keys: Keys, task_id: str, state: TaskState) -> bool:
    return bool(await client.hget(keys.task(task_id), "state") == state.value.encode())


async def test_an_outage_is_two_log_lines_however_many_tasks_are_in_flight(
    private_redis: RedisServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis goes away with 8 tasks in flight: one warning with the cause (which names the
    address), one line with the outage's length when it is back, and every task ends once."""
    INCIDENTS.recovered()  # no incident left open by another test of this process
    INCIDENTS.target = private_redis.url  # as the composition root sets it
    client = Redis.from_url(private_redis.url, socket_timeout=2, socket_connect_timeout=1)
    keys = Keys(namespace)
    p = Producer(ProducerConfig(namespace=namespace), client=client)
    try:
        async with running_worker(client, keys, tokens_per_s=20, slots=8) as worker:
            ids = [await p.submit("echo", f"task {i}", max_tokens=10) for i in range(8)]
            await wait_for(lambda: worker.inflight == 8, 5)
            with caplog.at_level("INFO"):
                private_redis.kill()  # with AOF off this loses the tasks' records...
                await wait_for(lambda: INCIDENTS.ongoing, 10)
                private_redis.start()
                await wait_for(lambda: not INCIDENTS.ongoing, 20)
                await wait_for(lambda: worker.inflight == 0, 20)
        warnings = [r for r in caplog.records if r.getMessage() == "redis unreachable"]
        assert len(warnings) == 1
        assert warnings[0].__dict__["redis"] == private_redis.url
        assert "Connection" in warnings[0].__dict__["error"]  # the cause, with its message
        back = [r for r in caplog.records if r.getMessage() == "redis reachable again"]
        assert len(back) == 1 and back[0].__dict__["down_s"] > 0
        assert len(ids) == 8  # ...so only the log is checked here; test_faults covers outcomes
    finally:
        await client.aclose()
