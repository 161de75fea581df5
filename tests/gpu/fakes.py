"""Fakes implementing gpu's own protocols, and the semaphore key names for tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from sop_llm.gpu.nvml import DeviceMemory

MIB = 1024 * 1024
GIB = 1024 * MIB


@dataclass
class FakeGpu:
    """Devices whose used memory is what others hold plus the models loaded through it: both a
    ``MemoryReader`` and a ``DeviceLoader``. ``sizes`` is what a model really takes."""

    total: list[int]
    others: list[int] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    loaded: dict[str, int | None] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)

    def used(self, index: int) -> int:
        base = self.others[index] if index < len(self.others) else 0
        return base + sum(self.sizes.get(m, 0) for m, d in self.loaded.items() if d == index)

    async def read(self) -> list[DeviceMemory]:
        return [
            DeviceMemory(
                index=i,
                name="Fake GPU",
                total_bytes=t,
                used_bytes=self.used(i),
                free_bytes=t - self.used(i),
                utilization_pct=0,
                temperature_c=40,
            )
            for i, t in enumerate(self.total)
        ]

    async def load(self, model: str, device: int | None) -> None:
        assert model not in self.loaded, f"{model} loaded twice"
        self.events.append(f"load {model} {device}")
        self.loaded[model] = device

    async def unload(self, model: str, device: int | None) -> None:
        assert self.loaded.get(model, -1) == device
        self.events.append(f"unload {model}")
        del self.loaded[model]
