"""The worker's own Redis links (``streams/link.py``) through a real worker: which connections
it opens, the redis-py path when they are off, and links broken while batches are being begun
and finished, which must lose and double nothing."""

from __future__ import annotations

import asyncio
import collections
import json
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from handlers.prepare import prepare
from streams.keys import TASK_GROUP, Keys
from streams.link import _Wire
from streams.outcome import Outcomes
from streams.outcome_scripts import BEGIN_MANY_SCRIPT, FINISH_MANY_SCRIPT
from tests.harness import results, running_worker, wait_results


async def named(client: Redis, prefix: str) -> list[dict[str, str]]:
    return [c for c in await client.client_list() if c.get("name", "").startswith(prefix)]


async def publish(client: Redis, keys: Keys, first: int, count: int) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(first, first + count):
        data = {"v": 1, "task_id": f"t{i}", "model": "echo", "prompt": "a b c", "max_tokens": 4}
        pipe.xadd(
            keys.tasks("default", "normal"), {"type": "task.submitted", "data": json.dumps(data)}
        )
    await pipe.execute()


@pytest.mark.parametrize("fast_link", [True, False])
async def test_tasks_are_served_with_and_without_the_links(
    client: Redis, keys: Keys, fast_link: bool
) -> None:
    consumer = f"wl-{keys.namespace}"
    await publish(client, keys, 0, 200)
    async with running_worker(client, keys, consumer=consumer, fast_link=fast_link):
        done = await wait_results(client, keys, 200)
        links = sorted(c["name"] for c in await named(client, consumer))
    assert sorted(r.task_id for r in done) == sorted(f"t{i}" for i in range(200))
    if fast_link:
        assert links == [f"{consumer}:control", f"{consumer}:read:default", f"{consumer}:write"]
    else:
        assert links == []
    assert await named(client, consumer) == []  # closed with the worker


@pytest.mark.parametrize("tokens_per_s", [0.0, 2000.0], ids=["instant", "runner"])
async def test_links_broken_mid_batch_lose_and_double_nothing(
    client: Redis,
    keys: Keys,
    tokens_per_s: float,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Break the write link around begins and finishes (before one is sent: it did not run;
    right after: it may have run, its reply is lost) and kill the read link, again and again:
    the entries of a failed begin stay pending and are adopted again, a failed finish is
    written again, and every task ends exactly once."""
    faults = collections.Counter[str]()
    send = _Wire.send

    def faulty(wire: _Wire, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        if args[0] == "EVALSHA" and args[1] in (BEGIN_MANY_SCRIPT.sha, FINISH_MANY_SCRIPT.sha):
            faults["calls"] += 1
            turn = faults["calls"]
            if turn % 9 == 1:
                faults["before"] += 1
                wire.close(RedisConnectionError("test: broken before sending"))
            elif turn % 9 == 5:
                faults["after"] += 1
                sent = send(wire, args)
                asyncio.get_running_loop().call_soon(
                    wire.close, RedisConnectionError("test: reply lost")
                )
                return sent
        return send(wire, args)

    monkeypatch.setattr(_Wire, "send", faulty)
    consumer = f"wk-{keys.namespace}"
    total, kills = 0, 0
    async with running_worker(client, keys, consumer=consumer, slots=16, tokens_per_s=tokens_per_s):
        for _ in range(8):
            await publish(client, keys, total, 150)
            total += 150
            await asyncio.sleep(0.05)
            for conn in await named(client, f"{consumer}:read"):
                kills += await client.client_kill_filter(_id=conn["id"])
        # adoption takes at most the free slots per reclaim tick: slow on a loaded machine
        try:
            await wait_results(client, keys, total, timeout=60)
        except TimeoutError:
            seen = {r.task_id for r in await results(client, keys)}
            missing = [f"t{i}" for i in range(total) if f"t{i}" not in seen]
            stream = keys.tasks("default", "normal")
            detail = await client.xpending_range(stream, TASK_GROUP, "-", "+", 10)
            statuses = [await client.hgetall(keys.task(t)) for t in missing[:3]]
            raise AssertionError(f"missing {missing[:10]}; pending {detail}; {statuses}") from None
        await asyncio.sleep(0.3)  # anything written twice would show up by now
        done = await results(client, keys)
        pending = (await client.xpending(keys.tasks("default", "normal"), TASK_GROUP))["pending"]
    counts = collections.Counter(r.task_id for r in done)
    assert max(counts.values()) == 1, f"written twice: {counts.most_common(3)}"
    assert len(counts) == total, f"{total - len(counts)} tasks without a result"
    assert pending == 0, f"{pending} entries still pending"
    assert faults["before"] >= 2 and faults["after"] >= 2, f"too few faults: {faults}"
    assert kills >= 1, "the read link was never killed"
    if tokens_per_s == 0:
        assert "begin failed, entries left pending" in caplog.text, "no begin failed"


async def test_a_batch_that_fails_to_prepare_is_adopted_again(
    client: Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected error while a batch is prepared neither ends the worker nor loses the
    batch: its entries stay pending and the worker adopts them again."""
    calls = collections.Counter[str]()

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("test: prepare broke")
        return prepare(*args, **kwargs)

    monkeypatch.setattr("handlers.admission.prepare", flaky)
    await publish(client, keys, 0, 1)
    async with running_worker(client, keys, consumer=f"wp-{keys.namespace}"):
        [result] = await wait_results(client, keys, 1, timeout=10)
    assert (result.task_id, result.attempts) == ("t0", 1)
    assert "preparing a batch failed, entries left pending" in caplog.text


async def test_a_begin_that_cannot_be_sent_leaves_the_batch_to_be_adopted_again(
    client: Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The begin of a drained batch is built and sent in the reader's turn: an error there
    (before anything was sent) is the batch's, not the read loop's, and loses nothing."""
    calls = collections.Counter[str]()
    send_begin = Outcomes.send_begin

    def flaky(self: Outcomes, starts: Any, now_ms: int) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("test: begin could not be built")
        return send_begin(self, starts, now_ms)

    monkeypatch.setattr(Outcomes, "send_begin", flaky)
    await publish(client, keys, 0, 1)
    async with running_worker(client, keys, consumer=f"wb-{keys.namespace}"):
        [result] = await wait_results(client, keys, 1, timeout=10)
    assert (result.task_id, result.attempts) == ("t0", 1)
    assert "begin failed, entries left pending" in caplog.text
    assert "consume loop error" not in caplog.text
