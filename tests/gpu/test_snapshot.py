"""What GET /v1/gpu serves: devices, memory, loaded models, semaphore holders and waiters."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any

from redis.asyncio import Redis

from sop_llm.gpu.admission import Admission, AdmissionConfig
from sop_llm.gpu.nvml import NvmlReader
from sop_llm.gpu.semaphore import Device, GpuSemaphore, SemaphoreConfig
from sop_llm.gpu.snapshot import gpu_snapshot
from sop_llm.ops.gpu_setup import device_keys
from sop_llm.streams.keys import Keys
from tests.conftest import wait_for
from tests.gpu.fakes import GIB, FakeGpu


async def test_the_snapshot_shows_memory_models_holders_and_waiters(
    client: Redis, keys: Keys
) -> None:
    gpu = FakeGpu(total=[16 * GIB], others=[GIB], sizes={"qwen": 4 * GIB})
    adm = Admission(reader=gpu, loader=gpu, config=AdmissionConfig())
    sem = GpuSemaphore(
        client=client,
        keys=device_keys(keys, "host-a", 0),
        device=Device("host-a", 0),
        config=SemaphoreConfig(permits=1, lease_ms=5000, poll_s=0.05),
    )
    async with adm.use("tiny", need_bytes=0):
        pass

    async def queued() -> None:
        async with sem.slot(priority=2, holder_id="worker-2:t9", timeout=5):
            pass

    async with (
        asyncio.TaskGroup() as tg,
        sem.slot(priority=0, holder_id="worker-1:t1", timeout=5) as slot,
        adm.use("qwen", need_bytes=4 * GIB),
    ):
        tg.create_task(queued())
        await wait_for(lambda: _waiters(sem), timeout=3)
        snap = await served(gpu_snapshot(reader=gpu, admission=adm, semaphores=[sem]))
    assert snap["status"] == "ok" and snap["errors"] == []
    [device] = snap["devices"]
    assert device == {
        "index": 0,
        "name": "Fake GPU",
        "total_bytes": 16 * GIB,
        "used_bytes": 5 * GIB,
        "free_bytes": 11 * GIB,
        "utilization_pct": 0,
        "temperature_c": 40,
    }
    models = {m["model"]: m for m in snap["models"]}
    assert models["qwen"]["device"] == 0 and models["qwen"]["in_use"] == 1
    assert models["tiny"]["device"] is None and models["tiny"]["in_use"] == 0
    [sem_row] = snap["semaphores"]
    assert sem_row["device"] == "host-a:0" and sem_row["permits"] == 1
    [holder] = sem_row["holders"]
    assert holder["holder"] == slot.holder and 0 < holder["expires_in_ms"] <= 5000
    [waiter] = sem_row["waiters"]
    assert waiter["holder"].startswith("worker-2:t9#") and waiter["priority"] == 2


async def served(snapshot: Coroutine[None, None, dict[str, object]]) -> Any:
    """The snapshot as the sidecar's client reads it (through JSON)."""
    return json.loads(json.dumps(await snapshot))


async def _waiters(sem: GpuSemaphore) -> int:
    return len((await sem.inspect()).waiters)


async def test_without_a_gpu_the_snapshot_says_why() -> None:
    reader = NvmlReader()
    snap = await served(gpu_snapshot(reader=reader))
    if reader.status == "ok":
        assert snap["devices"]
    else:
        assert snap["status"] == reader.status and str(reader.status).startswith("no GPU")
        assert snap["devices"] == [] and snap["models"] == [] and snap["errors"] == []
    await reader.aclose()


async def test_an_unreachable_redis_is_an_error_entry_not_a_failure(keys: Keys) -> None:
    dead = Redis(port=1, socket_connect_timeout=0.2, socket_timeout=0.2)
    sem = GpuSemaphore(
        client=dead,
        keys=device_keys(keys, "host-a", 0),
        device=Device("host-a", 0),
        config=SemaphoreConfig(permits=1, command_timeout_s=1),
    )
    snap = await served(gpu_snapshot(reader=FakeGpu(total=[GIB]), semaphores=[sem]))
    await dead.aclose()
    assert snap["semaphores"] == [] and len(snap["devices"]) == 1
    [error] = snap["errors"]
    assert error.startswith("semaphore host-a:0: ")
