"""The NVML reader: "no GPU" reported cleanly here, device readings through a stand-in NVML."""

from __future__ import annotations

import asyncio
import sys
import types
from dataclasses import dataclass

import pytest

from sop_llm.gpu.nvml import NO_GPU, DeviceMemory, MemoryReader, NvmlError, NvmlReader, VramMonitor
from tests.conftest import wait_for
from tests.gpu.fakes import GIB, FakeGpu


async def test_the_real_reader_reports_no_gpu_cleanly_or_real_devices() -> None:
    reader = NvmlReader()
    devices = await reader.read()
    if reader.status == "ok":  # an NVIDIA machine: the readings must be real
        assert devices and all(d.total_bytes > 0 for d in devices)
        assert all(d.used_bytes + d.free_bytes <= d.total_bytes for d in devices)
    else:
        assert devices == []
        assert reader.status.startswith(f"{NO_GPU}: ")
        assert await reader.read() == []  # and it stays quiet
    await reader.aclose()


class _NVMLError(Exception):
    pass


@dataclass
class _Mem:
    total: int
    used: int
    free: int


@dataclass
class _Rates:
    gpu: int


class FakeNvml(types.ModuleType):
    """The part of pynvml the reader uses; device 1 reports no temperature."""

    NVMLError = _NVMLError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, *, devices: int = 2, init_fails: bool = False) -> None:
        super().__init__("pynvml")
        self.devices = devices
        self.init_fails = init_fails
        self.lost = False
        self.calls: list[str] = []

    def nvmlInit(self) -> None:
        if self.init_fails:
            raise _NVMLError("Driver Not Loaded")
        self.calls.append("init")

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return self.devices

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str | bytes:
        return b"NVIDIA H200" if handle == 0 else "NVIDIA L4"  # old bindings answer bytes

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> _Mem:
        if self.lost:
            raise _NVMLError("GPU is lost")
        used = (handle + 1) * GIB
        return _Mem(80 * GIB, used, 80 * GIB - used)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> _Rates:
        return _Rates(10 * handle)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        if handle == 1:
            raise _NVMLError("Not Supported")
        return 55


async def test_devices_are_read_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    reader = NvmlReader()
    assert await reader.read() == [
        DeviceMemory(0, "NVIDIA H200", 80 * GIB, GIB, 79 * GIB, 0, 55),
        DeviceMemory(1, "NVIDIA L4", 80 * GIB, 2 * GIB, 78 * GIB, 10, None),
    ]
    assert reader.status == "ok"
    await reader.read()
    await reader.aclose()
    assert nvml.calls == ["init", "shutdown"]


async def test_a_driver_that_does_not_load_means_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(init_fails=True))
    reader = NvmlReader()
    assert await reader.read() == []
    assert reader.status == "no GPU: Driver Not Loaded"


async def test_no_device_or_no_package_means_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(devices=0))
    reader = NvmlReader()
    assert await reader.read() == []
    assert reader.status == "no GPU: NVML reports no device"
    monkeypatch.setitem(sys.modules, "pynvml", None)  # what an uninstalled package looks like
    reader = NvmlReader()
    assert await reader.read() == []
    assert reader.status == "no GPU: nvidia-ml-py is not installed"


async def test_a_device_failing_later_raises_our_error(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    reader = NvmlReader()
    await reader.read()
    nvml.lost = True
    with pytest.raises(NvmlError, match="GPU is lost"):
        await reader.read()


async def test_the_monitor_samples_on_its_interval() -> None:
    gpu = FakeGpu(total=[8 * GIB])
    monitor = VramMonitor(reader=gpu, interval_s=0.05)
    readers: list[MemoryReader] = [monitor, NvmlReader(), gpu]  # checked by mypy
    assert len(readers) == 3
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(monitor.run(stop))
        first = await wait_for(lambda: monitor.latest, timeout=3)
        gpu.others = [GIB]
        later = await wait_for(
            lambda: monitor.latest is not None and monitor.latest.devices[0].used_bytes == GIB,
            timeout=3,
        )
        stop.set()
    assert later and first.devices[0].used_bytes == 0
    assert monitor.status == "ok"
    assert (await monitor.read())[0].used_bytes == GIB  # answered from the latest sample
