"""Local models take a GPU slot of their device; remote ones never do."""

from __future__ import annotations

import asyncio
import itertools
import time

from redis.asyncio import Redis

from sop_llm.gpu import Device, GpuSemaphore, SemaphoreConfig
from sop_llm.handlers.tasks.gpu import GpuGate
from sop_llm.ops.gpu_setup import device_keys
from sop_llm.providers.base import Capabilities, DeltaSink, Generation, GenerationRequest
from sop_llm.providers.registry import ModelRegistry
from sop_llm.schemas.result import TaskState, Usage
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.harness import running_worker, wait_results


class TimedProvider:
    """Records when each generation ran."""

    def __init__(
        self, *, gpu: bool, seconds: float, log: list[tuple[str, float, float]], name: str
    ) -> None:
        self._caps = Capabilities(needs_gpu_slot=gpu, max_concurrency=4)
        self._seconds = seconds
        self._log = log
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    async def generate(
        self, request: GenerationRequest, *, on_delta: DeltaSink | None = None
    ) -> Generation:
        start = time.monotonic()
        await asyncio.sleep(self._seconds)
        self._log.append((request.prompt or "", start, time.monotonic()))
        return Generation(text="ok", finish_reason="stop", usage=Usage(output_tokens=1))


def semaphore(client: Redis, keys: Keys) -> GpuSemaphore:
    return GpuSemaphore(
        client=client, keys=device_keys(keys, "host-a", 0), device=Device("host-a", 0),
        config=SemaphoreConfig(permits=1, lease_ms=2000, poll_s=0.02),
    )  # fmt: skip


def gate(
    client: Redis, keys: Keys, sem: GpuSemaphore | None = None, *, slot_timeout_s: float = 600.0
) -> GpuGate:
    sem = sem or semaphore(client, keys)
    return GpuGate(
        semaphores={0: sem}, partitions=("high", "normal", "low"), slot_timeout_s=slot_timeout_s
    )


async def test_two_workers_one_permit_never_overlap(client: Redis, keys: Keys) -> None:
    log: list[tuple[str, float, float]] = []
    registries = []
    for _ in range(2):
        r = ModelRegistry()
        r.register("local", TimedProvider(gpu=True, seconds=0.1, log=log, name="llama_cpp"))
        r.register("remote", TimedProvider(gpu=False, seconds=0.3, log=log, name="openai"))
        registries.append(r)
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    async with (
        running_worker(client, keys, consumer="a", registry=registries[0], gpu=gate(client, keys)),
        running_worker(client, keys, consumer="b", registry=registries[1], gpu=gate(client, keys)),
    ):
        for i in range(6):
            await p.submit("local", f"local {i}")
        for i in range(4):
            await p.submit("remote", f"remote {i}")
        await wait_results(client, keys, 10, timeout=20)
    local = sorted((s, e) for name, s, e in log if name.startswith("local"))
    assert len(local) == 6
    assert all(prev_end <= start for (_, prev_end), (start, _) in itertools.pairwise(local))
    # remote models ran beside the local ones: they hold no GPU slot
    remote = [(s, e) for name, s, e in log if name.startswith("remote")]
    span = (min(s for s, _ in local), max(e for _, e in local))
    assert any(s < span[1] and e > span[0] for s, e in remote)


async def test_no_gpu_slot_in_time_fails_the_task_with_timeout(client: Redis, keys: Keys) -> None:
    held = semaphore(client, keys)
    slow_gate = gate(client, keys, held, slot_timeout_s=0.3)
    log: list[tuple[str, float, float]] = []
    registry = ModelRegistry()
    registry.register("local", TimedProvider(gpu=True, seconds=0.01, log=log, name="llama_cpp"))
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    # someone else holds the device's only permit for longer than the task may wait
    async with (
        held.slot(priority=0, holder_id="other-process", timeout=5),
        running_worker(client, keys, registry=registry, gpu=slow_gate, max_attempts=1),
    ):
        task_id = await p.submit("local", "wants the gpu")
        result = await p.wait(task_id, timeout=10)
    assert result.state == TaskState.FAILED  # a failure, not an expired deadline
    assert result.error is not None and result.error.code == "timeout"
    assert log == []  # the model never ran
