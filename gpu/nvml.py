"""VRAM monitoring through NVML (the ``nvidia-ml-py`` package, module ``pynvml``).

``pynvml`` is imported on first use, so a host without it (or without an NVIDIA driver) imports
this module fine: :class:`NvmlReader` then reports no devices and says why in ``status``, and
CPU models run as usual. NVML calls block, so they run in a worker thread under a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Final, Protocol, runtime_checkable

from sop_llm.schemas.errors import SopError

log = logging.getLogger(__name__)

NO_GPU: Final = "no GPU"


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    """One device as sampled. Utilisation (percent) and temperature (Celsius) are ``None`` where
    the device does not report them."""

    index: int
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    utilization_pct: int | None = None
    temperature_c: int | None = None


class MemoryReader(Protocol):
    """Where device memory figures come from: NVML in production, a fake in tests."""

    async def read(self) -> list[DeviceMemory]: ...


@runtime_checkable
class Described(Protocol):
    """A reader that can say why it sees no device (``"ok"`` when it works)."""

    @property
    def status(self) -> str: ...


class NvmlError(SopError):
    """NVML failed while reading a device that it had reported (a GPU fallen off the bus...)."""


def _optional(nvml: ModuleType, call: Callable[..., object], *args: object) -> object:
    """A reading a device may not support (NVMLError_NotSupported and friends): ``None``."""
    try:
        return call(*args)
    except nvml.NVMLError:
        return None


class NvmlReader:
    """:class:`MemoryReader` over NVML. Initialises NVML once, on the first read; a missing
    library or driver makes every read return ``[]`` with ``status`` ``"no GPU: <reason>"``."""

    def __init__(self, *, timeout_s: float = 5.0) -> None:
        self._timeout_s = timeout_s
        self._nvml: ModuleType | None = None
        self._status = "not started"
        self._lock = asyncio.Lock()

    @property
    def status(self) -> str:
        return self._status

    async def read(self) -> list[DeviceMemory]:
        """The devices as they are now; ``[]`` when there is no usable GPU. Raises
        ``TimeoutError`` when NVML does not answer within the deadline."""
        async with self._lock, asyncio.timeout(self._timeout_s):
            if self._nvml is None and self._status == "not started":
                self._nvml, self._status = await asyncio.to_thread(self._start)
            if self._nvml is None:
                return []
            nvml = self._nvml
            try:
                return await asyncio.to_thread(self._sample, nvml)
            except nvml.NVMLError as exc:
                raise NvmlError(f"NVML read failed: {exc}") from exc

    async def aclose(self) -> None:
        async with self._lock:
            nvml, self._nvml = self._nvml, None
            self._status = "closed"
            if nvml is not None:
                async with asyncio.timeout(self._timeout_s):
                    await asyncio.to_thread(nvml.nvmlShutdown)

    @staticmethod
    def _start() -> tuple[ModuleType | None, str]:
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError:
            return None, f"{NO_GPU}: nvidia-ml-py is not installed"
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:  # no driver, no library, no device
            return None, f"{NO_GPU}: {exc}"
        count = int(nvml.nvmlDeviceGetCount())
        if count == 0:
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlShutdown()
            return None, f"{NO_GPU}: NVML reports no device"
        log.info("nvml started", extra={"devices": count})
        return nvml, "ok"

    @staticmethod
    def _sample(nvml: ModuleType) -> list[DeviceMemory]:
        out = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            rates = _optional(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
            temp = _optional(nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
            out.append(
                DeviceMemory(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    total_bytes=int(mem.total),
                    used_bytes=int(mem.used),
                    free_bytes=int(mem.free),
                    utilization_pct=getattr(rates, "gpu", None),
                    temperature_c=temp if isinstance(temp, int) else None,
                )
            )
        return out


@dataclass(frozen=True, slots=True)
class Sample:
    devices: Sequence[DeviceMemory]
    taken_at: float  # time.time() of the reading


class VramMonitor:
    """Samples a reader every ``interval_s`` (run :meth:`run` in the worker's task group).

    It is a :class:`MemoryReader` itself, answering from the latest sample while that is younger
    than the interval (fresh admission decisions want :meth:`read_fresh`)."""

    def __init__(self, *, reader: MemoryReader, interval_s: float = 5.0) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self._reader = reader
        self._interval_s = interval_s
        self._latest: Sample | None = None
        self._taken_mono = 0.0

    @property
    def latest(self) -> Sample | None:
        return self._latest

    @property
    def status(self) -> str:
        return self._reader.status if isinstance(self._reader, Described) else "ok"

    async def read(self) -> list[DeviceMemory]:
        if self._latest is not None and time.monotonic() - self._taken_mono < self._interval_s:
            return list(self._latest.devices)
        return await self.read_fresh()

    async def read_fresh(self) -> list[DeviceMemory]:
        devices = await self._reader.read()
        self._latest = Sample(tuple(devices), time.time())
        self._taken_mono = time.monotonic()
        return devices

    async def run(self, stop: asyncio.Event) -> None:
        """Sample until ``stop`` is set; a failed reading is logged and tried next time."""
        while not stop.is_set():
            try:
                await self.read_fresh()
            except (TimeoutError, OSError, NvmlError) as exc:
                log.warning("gpu sampling failed", extra={"error": repr(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._interval_s)
