"""The GPU semaphore (cross-process, through Redis), VRAM monitoring and model admission."""

from sop_llm.gpu.admission import (
    Admission,
    AdmissionConfig,
    DeviceLoader,
    InsufficientVramError,
    LoadedModel,
    ModelLoadTimeoutError,
    estimate_need,
)
from sop_llm.gpu.nvml import NO_GPU, DeviceMemory, MemoryReader, NvmlError, NvmlReader, VramMonitor
from sop_llm.gpu.semaphore import (
    Device,
    DeviceKeys,
    GpuSemaphore,
    Holder,
    Semaphore,
    SemaphoreConfig,
    SemaphoreState,
    Slot,
    SlotTimeoutError,
    Waiter,
)
from sop_llm.gpu.snapshot import gpu_snapshot

__all__ = [
    "NO_GPU",
    "Admission",
    "AdmissionConfig",
    "Device",
    "DeviceKeys",
    "DeviceLoader",
    "DeviceMemory",
    "GpuSemaphore",
    "Holder",
    "InsufficientVramError",
    "LoadedModel",
    "MemoryReader",
    "ModelLoadTimeoutError",
    "NvmlError",
    "NvmlReader",
    "Semaphore",
    "SemaphoreConfig",
    "SemaphoreState",
    "Slot",
    "SlotTimeoutError",
    "VramMonitor",
    "Waiter",
    "estimate_need",
    "gpu_snapshot",
]
