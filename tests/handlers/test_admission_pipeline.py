"""Model admission through a real worker: a real tiny llama.cpp model, a fake device memory.

The CPU build of llama.cpp runs the model on the CPU whatever ``n_gpu_layers`` says; the specs
offload every layer so that ``estimated_bytes`` (what admission checks) is above 0, and the fake
device's used memory counts the estimate of every model the worker has loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from redis.asyncio import Redis

pytest.importorskip("llama_cpp")

from sop_llm.gpu import (
    Admission,
    AdmissionConfig,
    Device,
    DeviceMemory,
    GpuSemaphore,
    SemaphoreConfig,
)
from sop_llm.handlers.tasks.gpu import GpuGate, ProviderLoader, loadable
from sop_llm.ops.gpu_setup import device_keys
from sop_llm.providers.base import Loadable
from sop_llm.providers.loader import load_registry
from sop_llm.providers.registry import ModelRegistry
from sop_llm.schemas.errors import ErrorCode
from sop_llm.schemas.models import ModelSpec
from sop_llm.schemas.result import TaskResult, TaskState
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.harness import echo_registry, running_worker, wait_results

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gguf")
    from tests.providers.tinygguf import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@dataclass
class FakeVram:
    """One device (a ``MemoryReader``): ``others`` bytes used by other processes plus the
    estimate of every model loaded in this worker."""

    total: int
    models: dict[str, Loadable] = field(default_factory=dict)
    others: int = 0

    def used(self) -> int:
        return self.others + sum(m.estimated_bytes() for m in self.models.values() if m.loaded)

    async def read(self) -> list[DeviceMemory]:
        used = self.used()
        return [DeviceMemory(0, "Fake GPU", self.total, used, self.total - used)]


@dataclass
class Setup:
    registry: ModelRegistry
    vram: FakeVram
    admission: Admission
    gate: GpuGate
    models: dict[str, Loadable]


@contextlib.asynccontextmanager
async def setup(
    client: Redis,
    keys: Keys,
    path: Path,
    *,
    names: tuple[str, ...],
    total: Callable[[int], int],
    idle_unload_s: float = 0.0,
) -> AsyncIterator[Setup]:
    """``names``: llama models of the tiny file; ``total``: the device size, given one model's
    estimate."""
    specs = [
        ModelSpec(
            name=n,
            provider="llama_cpp",
            path=str(path),
            context_window=1024,
            n_threads=1,
            n_gpu_layers=-1,
        )
        for n in names
    ]
    registry, owner = await load_registry(specs, env={}, registry=echo_registry())
    models = {}
    for n in names:
        model = loadable(registry.resolve(n).provider)
        assert model is not None and not model.loaded  # built, not loaded
        models[n] = model
    need = models[names[0]].estimated_bytes()
    assert need > 0
    vram = FakeVram(total=total(need), models=models)
    loader = ProviderLoader()
    admission = Admission(
        reader=vram,
        loader=loader,
        config=AdmissionConfig(
            max_vram_usage_percent=100, vram_reserve_mb=0, idle_unload_s=idle_unload_s
        ),
    )
    sem = GpuSemaphore(
        client=client, keys=device_keys(keys, "host-a", 0), device=Device("host-a", 0),
        config=SemaphoreConfig(permits=1, lease_ms=2000, poll_s=0.02),
    )  # fmt: skip
    gate = GpuGate(
        semaphores={0: sem},
        partitions=("high", "normal", "low"),
        admission=admission,
        loader=loader,
    )
    try:
        yield Setup(registry, vram, admission, gate, models)
    finally:
        await owner.close()


def producer(client: Redis, keys: Keys) -> Producer:
    return Producer(ProducerConfig(namespace=keys.namespace), client=client)


def by_id(results: list[TaskResult]) -> dict[str, TaskResult]:
    return {r.task_id: r for r in results}


async def test_a_model_that_does_not_fit_fails_cleanly_and_the_worker_goes_on(
    client: Redis, keys: Keys, gguf_path: Path
) -> None:
    async with setup(
        client, keys, gguf_path, names=("tiny",), total=lambda need: need - MIB // 8
    ) as s:
        p = producer(client, keys)
        async with running_worker(client, keys, registry=s.registry, gpu=s.gate):
            big = await p.submit("tiny", "Hello world", max_tokens=4)
            done = by_id(await wait_results(client, keys, 1))
            echo = await p.submit("echo", "still here", max_tokens=2)
            done = by_id(await wait_results(client, keys, 2))
        failed = done[big]
        assert failed.state == TaskState.FAILED and failed.error is not None
        assert failed.error.code == ErrorCode.INSUFFICIENT_VRAM
        assert "'tiny' needs" in failed.error.message and "of VRAM" in failed.error.message
        assert failed.attempts == 1  # final: not retried
        assert done[echo].state == TaskState.COMPLETED and done[echo].text == "still here"
        assert not s.models["tiny"].loaded and s.admission.loaded() == []


async def test_a_model_that_fits_is_loaded_and_runs(
    client: Redis, keys: Keys, gguf_path: Path
) -> None:
    async with setup(client, keys, gguf_path, names=("tiny",), total=lambda need: 4 * need) as s:
        p = producer(client, keys)
        async with running_worker(client, keys, registry=s.registry, gpu=s.gate):
            first = await p.submit("tiny", "Hello world", max_tokens=4, seed=1)
            second = await p.submit("tiny", "Hello again", max_tokens=4, seed=2)
            done = by_id(await wait_results(client, keys, 2))
        for task in (first, second):
            usage = done[task].usage
            assert done[task].state == TaskState.COMPLETED
            assert usage is not None and (usage.output_tokens or 0) >= 1
        [loaded] = s.admission.loaded()
        assert loaded.model == "tiny" and loaded.device == 0 and loaded.in_use == 0
        assert loaded.need_bytes == s.models["tiny"].estimated_bytes()
        assert s.models["tiny"].loaded


async def test_the_idle_lru_model_is_unloaded_to_admit_another(
    client: Redis, keys: Keys, gguf_path: Path
) -> None:
    # room for one model and a half: the second needs the first one out
    async with setup(
        client, keys, gguf_path, names=("tiny-a", "tiny-b"), total=lambda need: need * 3 // 2
    ) as s:
        p = producer(client, keys)
        async with running_worker(client, keys, registry=s.registry, gpu=s.gate):
            a = await p.submit("tiny-a", "Hello world", max_tokens=3, seed=1)
            await wait_results(client, keys, 1)
            assert s.models["tiny-a"].loaded and not s.models["tiny-b"].loaded
            b = await p.submit("tiny-b", "Hello world", max_tokens=3, seed=1)
            done = by_id(await wait_results(client, keys, 2))
            assert done[a].state == done[b].state == TaskState.COMPLETED
            assert not s.models["tiny-a"].loaded and s.models["tiny-b"].loaded
            assert [m.model for m in s.admission.loaded()] == ["tiny-b"]
            # and back again: a is admitted by unloading b, now the idle one
            a2 = await p.submit("tiny-a", "Hello world", max_tokens=3, seed=1)
            done = by_id(await wait_results(client, keys, 3))
        assert done[a2].state == TaskState.COMPLETED and done[a2].text == done[a].text
        assert [m.model for m in s.admission.loaded()] == ["tiny-a"]
        assert s.models["tiny-a"].loaded and not s.models["tiny-b"].loaded


async def test_an_idle_model_is_unloaded_after_the_configured_time(
    client: Redis, keys: Keys, gguf_path: Path
) -> None:
    async with setup(
        client, keys, gguf_path, names=("tiny",), total=lambda need: 4 * need, idle_unload_s=0.4
    ) as s:
        stop = asyncio.Event()
        idle = asyncio.create_task(s.admission.run(stop))
        p = producer(client, keys)
        try:
            async with running_worker(client, keys, registry=s.registry, gpu=s.gate):
                task = await p.submit("tiny", "Hello world", max_tokens=3)
                [result] = await wait_results(client, keys, 1)
                assert result.task_id == task and result.state == TaskState.COMPLETED
                assert s.models["tiny"].loaded
                async with asyncio.timeout(5):
                    while s.models["tiny"].loaded or s.admission.loaded():
                        await asyncio.sleep(0.05)
                assert s.vram.used() == 0
                # the next task loads it again
                again = await p.submit("tiny", "Hello again", max_tokens=3)
                done = by_id(await wait_results(client, keys, 2))
                assert done[again].state == TaskState.COMPLETED
        finally:
            stop.set()
            await idle
