"""This host's GPUs as a worker and the sidecar see them: NVML sampling and device semaphores."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from gpu import (
    Device,
    DeviceKeys,
    GpuSemaphore,
    NvmlError,
    NvmlReader,
    SemaphoreConfig,
    VramMonitor,
    gpu_snapshot,
)
from handlers.metrics import Metrics
from ops.settings import Settings
from streams.keys import Keys

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
    monitor: VramMonitor
    semaphores: dict[int, GpuSemaphore] = field(default_factory=dict)

    async def snapshot(self) -> dict[str, Any]:
        return await gpu_snapshot(reader=self.monitor, semaphores=list(self.semaphores.values()))

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
    return GpuRuntime(monitor=monitor, semaphores=semaphores)
