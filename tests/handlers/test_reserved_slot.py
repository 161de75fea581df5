"""Reserved slots: a model's spare slot (a batching model's spare sequence) goes to a task of
the pool's first partition only, once the model's other slots are all in use, so that a
``high`` task arriving at a full model starts at once."""

from __future__ import annotations

from redis.asyncio import Redis

from sop_llm.handlers.tasks.slots import SlotBudget
from sop_llm.providers.echo import EchoProvider
from sop_llm.providers.registry import ModelRegistry
from sop_llm.schemas.result import TaskState
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.conftest import wait_for
from tests.fakes import ScriptedProvider
from tests.harness import running_worker

LONG = " ".join(["t"] * 30)  # 1.5 s at 0.05 s a token


def _two_long(n: int) -> str:
    """The first two calls are long, the rest short."""
    return LONG if n < 2 else "a b"


def test_a_reserved_slot_is_for_the_first_partition_once_the_others_are_taken() -> None:
    budget = SlotBudget(
        capacity=lambda m: 2, reserved=lambda m: 1 if m == "batch" else 0, pool_caps={"p": 2}
    )
    a, b = budget.take("p", "batch"), budget.take("p", "batch")
    assert a is not None and b is not None and not a.reserved
    assert budget.free("p", "batch") == 0 and budget.free_reserved("batch") == 1
    assert budget.take("p", "batch") is None  # not for a task of another partition
    high = budget.take("p", "batch", first=True)
    assert high is not None and high.reserved  # over the pool cap too: it is the model's spare
    assert budget.take("p", "batch", first=True) is None  # one spare, taken
    assert budget.take("p", "plain", first=True) is None  # a model with no spare
    a.release()
    assert budget.free_reserved("batch") == 0  # an ordinary slot is free: it goes first
    again = budget.take("p", "batch", first=True)
    assert again is not None and not again.reserved
    high.release()
    high.release()  # once only
    assert budget.free_reserved("batch") == 1 and budget.free("p", "batch") == 0


def _beside_echo(batch: ScriptedProvider) -> ModelRegistry:
    """The default layout: the batching model beside the built-in echo in one pool."""
    registry = ModelRegistry()
    registry.register("echo", EchoProvider(slots=64))
    registry.register("batch", batch)
    return registry


async def _first_running(p: Producer, batch: ScriptedProvider) -> str:
    """A low task holding the model's one ordinary slot."""
    first = await p.submit("batch", "first", priority="low")
    await wait_for(lambda: len(batch.calls) == 1, 5)
    return first


async def _parked(client: Redis, keys: Keys) -> int:
    return int(await client.zcard(keys.parked("default", "batch")))


async def test_a_high_task_starts_at_once_on_a_full_model_beside_echo(
    client: Redis, keys: Keys
) -> None:
    batch = ScriptedProvider(_two_long, per_token_s=0.05, slots=1, reserved=1)
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    async with running_worker(client, keys, registry=_beside_echo(batch), slots=None):
        first = await _first_running(p, batch)
        lows = [await p.submit("batch", f"low {i}", priority="low") for i in range(3)]
        normal = await p.submit("batch", "normal")
        await wait_for(lambda: _parked_is(client, keys, 4), 5)  # none of them took the spare
        high = await p.submit("batch", "high one", priority="high")
        await wait_for(lambda: len(batch.calls) == 2, 0.5)  # started while "first" runs
        assert batch.requests[1].prompt == "high one"
        status = await p.status(first)
        assert status is not None and status.state == TaskState.RUNNING
        second = await p.submit("batch", "high two", priority="high")  # the spare is taken
        done = {t: await p.wait(t, timeout=30) for t in [first, high, second, normal, *lows]}
    assert all(r.state == TaskState.COMPLETED for r in done.values())
    order = [r.prompt for r in batch.requests]
    # the second high waited, but went first when a slot freed; then the rest by priority
    assert order == ["first", "high one", "high two", "normal", "low 0", "low 1", "low 2"]


async def _parked_is(client: Redis, keys: Keys, n: int) -> bool:
    return await _parked(client, keys) == n


async def test_a_model_alone_in_its_pool_reads_only_high_while_only_its_spare_is_free(
    client: Redis, keys: Keys
) -> None:
    batch = ScriptedProvider(_two_long, per_token_s=0.05, slots=1, reserved=1)
    registry = ModelRegistry()
    registry.register("batch", batch)
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    async with running_worker(client, keys, registry=registry, slots=None):
        first = await p.submit("batch", "first")
        await wait_for(lambda: len(batch.calls) == 1, 5)
        lows = [await p.submit("batch", f"low {i}", priority="low") for i in range(3)]
        high = await p.submit("batch", "high", priority="high")
        await wait_for(lambda: len(batch.calls) == 2, 0.5)
        # the lows were not read: they wait in their stream, not parked, not held here
        assert await _parked(client, keys) == 0
        pending = await client.xpending(keys.tasks("default", "low"), "workers")
        assert pending["pending"] == 0
        done = [await p.wait(t, timeout=30) for t in [first, high, *lows]]
    assert all(r.state == TaskState.COMPLETED for r in done)
    assert [r.prompt for r in batch.requests] == ["first", "high", "low 0", "low 1", "low 2"]


async def test_with_one_partition_the_spare_stays_unused(client: Redis, keys: Keys) -> None:
    batch = ScriptedProvider([LONG], per_token_s=0.05, slots=1, reserved=1)
    registry = ModelRegistry()
    registry.register("batch", batch)
    p = Producer(ProducerConfig(namespace=keys.namespace, partitions=("normal",)), client=client)
    async with running_worker(client, keys, registry=registry, slots=None, partitions=("normal",)):
        tasks = [await p.submit("batch", f"t{i}") for i in range(2)]
        await wait_for(lambda: len(batch.calls) == 1, 5)
        done = [await p.wait(t, timeout=30) for t in tasks]
    assert all(r.state == TaskState.COMPLETED for r in done)
    # one after the other: no second task ever ran beside the first
    assert batch.calls[1] - batch.calls[0] >= 1.4


async def test_a_parked_high_task_takes_the_spare_once_it_frees(client: Redis, keys: Keys) -> None:
    """Beside echo, a second high task is parked while the spare is taken; when the spare frees
    it takes it at once, before the ordinary slot frees."""
    batch = ScriptedProvider(
        lambda n: LONG if n == 0 else "a b c d", per_token_s=0.05, slots=1, reserved=1
    )
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    async with running_worker(client, keys, registry=_beside_echo(batch), slots=None):
        first = await _first_running(p, batch)
        lows = [await p.submit("batch", f"low {i}", priority="low") for i in range(2)]
        highs = [await p.submit("batch", f"high {i}", priority="high") for i in range(2)]
        done = {t: await p.wait(t, timeout=30) for t in [first, *highs, *lows]}
    assert all(r.state == TaskState.COMPLETED for r in done.values())
    assert [r.prompt for r in batch.requests] == ["first", "high 0", "high 1", "low 0", "low 1"]
    # "high 1" ran on the spare after "high 0" (0.2 s each), long before "first" (1.5 s) ended
    assert batch.calls[2] - batch.calls[0] < 1.0, batch.calls
