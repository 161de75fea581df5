"""This host's GPUs as a worker and the sidecar see them: NVML sampling, device semaphores and
model admission (load a local model only where it fits; unload idle ones)."""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from sop_llm.gpu import (
    Admission,
    AdmissionConfig,
    Device,
    DeviceKeys,
    DeviceMemory,
    GpuSemaphore,
    NvmlError,
    NvmlReader,
    SemaphoreConfig,
    VramMonitor,
    gpu_snapshot,
)
from sop_llm.handlers.metrics import Metrics
from sop_llm.handlers.tasks.gpu import ProviderLoader
from sop_llm.ops.settings import Settings
from sop_llm.streams.keys import Keys

log = logging.getLogger(__name__)


def device_keys(keys: Keys, host: str, index: int) -> DeviceKeys:
    return DeviceKeys(
        holders=keys.gpu(host, index),
        waiters=keys.gpu_waiters(host, index),
        leases=keys.gpu_waiter_leases(host, index),
        seq=keys.gpu_seq(host, index),
        wake=keys.gpu_wake(host, index),
    )


@dataclass(slots=True)
class GpuRuntime:
    """``admission`` (built with ``loader``) loads local models; hand both to the worker's
    ``GpuGate``. Run :meth:`run` in the worker's task group."""

    monitor: VramMonitor
    semaphores: dict[int, GpuSemaphore] = field(default_factory=dict)
    loader: ProviderLoader = field(default_factory=ProviderLoader)
    admission: Admission | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Sample the devices and unload idle models until ``stop`` is set."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.monitor.run(stop))
            if self.admission is not None:
                tg.create_task(self.admission.run(stop))

    async def snapshot(self) -> dict[str, Any]:
        return await gpu_snapshot(
            reader=self.monitor,
            admission=self.admission,
            semaphores=list(self.semaphores.values()),
        )

    def export(self, metrics: Metrics) -> None:
        """Put the latest memory sample on the ``sop_gpu_memory_bytes`` gauge."""
        sample = self.monitor.latest
        for d in sample.devices if sample else ():
            for kind, value in (
                ("total", d.total_bytes),
                ("used", d.used_bytes),
                ("free", d.free_bytes),
            ):
                metrics.gpu_memory.labels(str(d.index), kind).set(value)


async def build_gpu_runtime(settings: Settings, client: Redis) -> GpuRuntime:
    """Sample the devices once and make a semaphore per device (none on a host without a GPU:
    CPU models still run)."""
    monitor = VramMonitor(reader=NvmlReader(), interval_s=settings.gpu_sample_interval_s)
    try:
        devices = await monitor.read_fresh()
    except (NvmlError, OSError, TimeoutError) as exc:
        log.warning("gpu sampling failed at start", extra={"error": repr(exc)})
        devices = []
    host = settings.gpu_host or socket.gethostname()
    keys = Keys(settings.namespace)
    config = SemaphoreConfig(
        permits=settings.gpu_permits,
        lease_ms=settings.gpu_lease_ms,
        poll_s=settings.gpu_poll_ms / 1000,
    )
    semaphores = {
        d.index: GpuSemaphore(
            client=client,
            keys=device_keys(keys, host, d.index),
            device=Device(host, d.index),
            config=config,
        )
        for d in devices
    }
    log.info("gpus", extra={"status": monitor.status, "devices": [d.index for d in devices]})
    loader = ProviderLoader()
    admission = Admission(
        reader=_Fresh(monitor),
        loader=loader,
        config=AdmissionConfig(
            max_vram_usage_percent=settings.max_vram_usage_percent,
            vram_reserve_mb=settings.vram_reserve_mb,
            idle_unload_s=settings.model_idle_unload_s,
        ),
    )
    return GpuRuntime(monitor=monitor, semaphores=semaphores, loader=loader, admission=admission)


class _Fresh:
    """Admission decides on a fresh reading (a load changes free memory at once), which also
    refreshes the monitor's sample for /v1/gpu and the metrics."""

    def __init__(self, monitor: VramMonitor) -> None:
        self._monitor = monitor

    async def read(self) -> list[DeviceMemory]:
        return await self._monitor.read_fresh()
