"""Taking a GPU slot around a local model's generation, ordered by task priority."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence

from gpu.semaphore import Semaphore
from providers.registry import ModelBinding

log = logging.getLogger(__name__)


class GpuGate:
    """Holds the device semaphores of this host. A model whose provider needs a GPU slot runs
    inside a slot of its device (``gpu_device`` of its spec, default 0); remote models never
    take one. Waiters are served by priority rank (the partition's place in ``partitions``)."""

    def __init__(
        self,
        *,
        semaphores: Mapping[int, Semaphore],
        partitions: Sequence[str],
        slot_timeout_s: float = 600.0,
    ) -> None:
        self._semaphores = dict(semaphores)
        self._ranks = {name: i for i, name in enumerate(partitions)}
        self._timeout = slot_timeout_s
        self._warned: set[str] = set()

    @contextlib.asynccontextmanager
    async def hold(
        self, binding: ModelBinding, *, partition: str, holder_id: str, deadline_s: float | None
    ) -> AsyncIterator[None]:
        if not binding.needs_gpu_slot:
            yield
            return
        device = binding.spec.gpu_device if binding.spec is not None else 0
        semaphore = self._semaphores.get(device)
        if semaphore is None:
            # no such GPU on this host (a CPU build of a local model): nothing to share
            if binding.name not in self._warned:
                self._warned.add(binding.name)
                log.warning(
                    "no GPU semaphore for a local model",
                    extra={"model": binding.name, "device": device},
                )
            yield
            return
        timeout = self._timeout if deadline_s is None else max(0.0, min(self._timeout, deadline_s))
        rank = self._ranks.get(partition, len(self._ranks))
        async with semaphore.slot(priority=rank, holder_id=holder_id, timeout=timeout):
            yield
