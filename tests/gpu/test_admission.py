"""Admission against a fake GPU: fit, least-recently-used eviction, refusal, idle unload."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from sop_llm.gpu.admission import Admission, AdmissionConfig, InsufficientVramError, estimate_need
from sop_llm.schemas.errors import SopError
from tests.conftest import wait_for
from tests.gpu.fakes import GIB, MIB, FakeGpu

# no reserve, no cap: the arithmetic of the tests stays readable
ALL = AdmissionConfig(max_vram_usage_percent=100, vram_reserve_mb=0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def admission(gpu: FakeGpu, config: AdmissionConfig = ALL, clock: Clock | None = None) -> Admission:
    return Admission(reader=gpu, loader=gpu, config=config, clock=clock or Clock())


def test_estimate_need_counts_offloaded_weights_and_kv_cache() -> None:
    kv_all = 2 * 4096 * 4096 * 2 * 32  # K and V, n_ctx x n_embd, f16, 32 layers: 2 GiB
    full = dict(gguf_bytes=1000 * MIB, n_layers=32, n_ctx=4096, n_embd=4096, n_layer=32)
    assert estimate_need(n_gpu_layers=-1, **full) == 1000 * MIB + kv_all
    assert estimate_need(n_gpu_layers=99, **full) == 1000 * MIB + kv_all
    assert estimate_need(n_gpu_layers=16, **full) == 500 * MIB + kv_all // 2
    assert estimate_need(n_gpu_layers=0, **full) == 0
    assert estimate_need(n_gpu_layers=-1, kv_bytes_per_elem=1, **full) == 1000 * MIB + kv_all // 2
    with pytest.raises(ValueError, match="n_layers"):
        estimate_need(gguf_bytes=1, n_layers=0, n_gpu_layers=1, n_ctx=1, n_embd=1, n_layer=1)


async def test_a_model_that_fits_is_loaded_once() -> None:
    gpu = FakeGpu(total=[10 * GIB], sizes={"a": 4 * GIB})
    adm = admission(gpu)

    async def use() -> int | None:
        async with adm.use("a", need_bytes=4 * GIB) as placed:
            await asyncio.sleep(0)
            return placed.device

    assert list(await asyncio.gather(use(), use(), use())) == [0, 0, 0]
    assert await use() == 0
    assert gpu.events == ["load a 0"]
    [m] = adm.loaded()
    assert (m.model, m.device, m.in_use) == ("a", 0, 0)


async def test_least_recently_used_idle_model_is_unloaded_for_room() -> None:
    gpu = FakeGpu(total=[10 * GIB], sizes={"a": 4 * GIB, "b": 4 * GIB, "c": 4 * GIB})
    clock = Clock()
    adm = admission(gpu, clock=clock)
    for name in ("a", "b", "a"):  # b is now the least recently used
        clock.now += 1
        async with adm.use(name, need_bytes=4 * GIB):
            pass
    async with adm.use("c", need_bytes=4 * GIB) as placed:
        assert placed.device == 0
    assert gpu.events == ["load a 0", "load b 0", "unload b", "load c 0"]
    assert sorted(gpu.loaded) == ["a", "c"]


async def test_a_model_in_use_is_never_unloaded_and_the_task_is_refused() -> None:
    gpu = FakeGpu(total=[10 * GIB], sizes={"a": 4 * GIB, "b": 4 * GIB, "c": 3 * GIB})
    adm = admission(gpu)
    async with adm.use("a", need_bytes=4 * GIB), adm.use("b", need_bytes=4 * GIB):
        with pytest.raises(InsufficientVramError) as info:
            async with adm.use("c", need_bytes=3 * GIB):
                pass
    err = info.value
    assert isinstance(err, SopError) and err.reason == "insufficient_vram"
    assert (err.model, err.need_bytes, err.available_bytes) == ("c", 3 * GIB, 2 * GIB)
    assert "'c' needs 3072 MiB" in str(err)
    assert "unload" not in " ".join(gpu.events)
    assert sorted(gpu.loaded) == ["a", "b"]


async def test_nothing_is_unloaded_when_unloading_could_not_make_room() -> None:
    gpu = FakeGpu(total=[10 * GIB], others=[3 * GIB], sizes={"a": 2 * GIB, "big": 8 * GIB})
    adm = admission(gpu)
    async with adm.use("a", need_bytes=2 * GIB):
        pass
    with pytest.raises(InsufficientVramError):
        async with adm.use("big", need_bytes=8 * GIB):
            pass
    assert gpu.events == ["load a 0"]
    assert list(gpu.loaded) == ["a"]


async def test_reserve_and_usage_cap_bound_the_room() -> None:
    # room = min(free - reserve, total * 80% - used) = min(10 - 1, 8) GiB = 8 GiB
    cfg = AdmissionConfig(max_vram_usage_percent=80, vram_reserve_mb=1024)
    gpu = FakeGpu(total=[10 * GIB], sizes={"x": 8 * GIB, "y": 8 * GIB + 1})
    with pytest.raises(InsufficientVramError):
        async with admission(gpu, cfg).use("y", need_bytes=8 * GIB + 1):
            pass
    async with admission(gpu, cfg).use("x", need_bytes=8 * GIB) as placed:
        assert placed.device == 0
    # the reserve wins when others already use the device
    cfg = AdmissionConfig(max_vram_usage_percent=100, vram_reserve_mb=2048)
    gpu = FakeGpu(total=[10 * GIB], others=[5 * GIB], sizes={"z": 4 * GIB})
    with pytest.raises(InsufficientVramError) as info:
        async with admission(gpu, cfg).use("z", need_bytes=4 * GIB):
            pass
    assert info.value.available_bytes == 3 * GIB


async def test_without_a_gpu_cpu_models_run_and_gpu_models_are_refused() -> None:
    gpu = FakeGpu(total=[])
    adm = admission(gpu)
    async with adm.use("cpu-model", need_bytes=0) as placed:
        assert placed.device is None
    with pytest.raises(InsufficientVramError, match="there is no GPU"):
        async with adm.use("gpu-model", need_bytes=GIB):
            pass
    assert gpu.events == ["load cpu-model None"]


async def test_a_model_goes_to_the_device_with_room_or_the_one_pinned() -> None:
    gpu = FakeGpu(total=[8 * GIB, 8 * GIB], others=[6 * GIB, 0], sizes={"a": 3 * GIB})
    adm = admission(gpu)
    async with adm.use("a", need_bytes=3 * GIB) as placed:
        assert placed.device == 1
    with pytest.raises(InsufficientVramError, match="no GPU device 7"):
        async with adm.use("b", need_bytes=GIB, device=7):
            pass
    with pytest.raises(InsufficientVramError):
        async with adm.use("c", need_bytes=3 * GIB, device=0):
            pass


async def test_idle_models_unload_after_the_configured_time() -> None:
    gpu = FakeGpu(total=[10 * GIB], sizes={"a": GIB, "b": GIB})
    clock = Clock()
    adm = admission(gpu, AdmissionConfig(idle_unload_s=60), clock)
    async with adm.use("a", need_bytes=GIB):
        pass
    clock.now += 30
    async with adm.use("b", need_bytes=GIB):
        clock.now += 45  # a: idle 75 s; b: in use
        assert await adm.unload_idle() == ["a"]
    assert await adm.unload_idle() == []  # b was used just now
    clock.now += 60
    assert await adm.unload_idle() == ["b"]
    assert gpu.loaded == {}


async def test_the_idle_loop_unloads_on_its_own() -> None:
    gpu = FakeGpu(total=[10 * GIB], sizes={"a": GIB})
    adm = Admission(reader=gpu, loader=gpu, config=AdmissionConfig(idle_unload_s=0.1))
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(adm.run(stop))
        async with adm.use("a", need_bytes=GIB):
            pass
        await wait_for(lambda: not gpu.loaded, timeout=3)
        stop.set()
    assert gpu.events == ["load a 0", "unload a"]


async def test_a_failed_load_leaves_nothing_loaded() -> None:
    class Broken(FakeGpu):
        async def load(self, model: str, device: int | None) -> None:
            raise RuntimeError("model file is corrupt")

    gpu = Broken(total=[10 * GIB])
    adm = admission(gpu)
    with contextlib.suppress(RuntimeError):
        async with adm.use("a", need_bytes=GIB):
            pytest.fail("the body must not run")
    assert adm.loaded() == []


async def test_a_retired_model_is_forgotten_and_loads_afresh() -> None:
    gpu = FakeGpu(total=[10 * GIB], sizes={"a": 4 * GIB})
    adm = admission(gpu)
    async with adm.use("a", need_bytes=4 * GIB):
        pass
    assert [m.model for m in adm.loaded()] == ["a"]
    del gpu.loaded["a"]  # its provider was closed, which freed its memory
    adm.forget("a")  # then the loader tells admission: nothing held, nothing to list
    assert adm.loaded() == []
    adm.forget("never-loaded")  # nothing to do
    async with adm.use("a", need_bytes=4 * GIB):
        pass
    assert gpu.events == ["load a 0", "load a 0"]
