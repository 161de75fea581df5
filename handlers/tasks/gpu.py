"""Taking a GPU slot around a local model's generation, ordered by task priority, and admitting
the model onto its device (loading it only where it fits in VRAM) inside that slot."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence

from sop_llm.gpu.admission import Admission
from sop_llm.gpu.semaphore import Semaphore
from sop_llm.providers.base import Loadable, Provider
from sop_llm.providers.configured import ConfiguredProvider
from sop_llm.providers.registry import ModelBinding

log = logging.getLogger(__name__)


class ProviderLoader:
    """gpu's ``DeviceLoader`` over the providers' :class:`Loadable`: admission loads and frees a
    model by name; this maps the name to the provider currently bound to it (the gate binds it
    before each admission, so a reloaded model's new provider is the one loaded next)."""

    def __init__(self) -> None:
        self._providers: dict[str, Loadable] = {}

    def bind(self, model: str, provider: Loadable) -> None:
        self._providers[model] = provider

    async def load(self, model: str, device: int | None) -> None:
        # the device is the provider's own (its spec's n_gpu_layers and gpu_device)
        await self._providers[model].load()

    async def unload(self, model: str, device: int | None) -> None:
        provider = self._providers.get(model)
        if provider is not None:
            await provider.unload()


def loadable(provider: Provider) -> Loadable | None:
    """The provider (or the backend inside a :class:`ConfiguredProvider`) that loads a local
    model on demand; ``None`` for the others."""
    if isinstance(provider, Loadable):
        return provider
    if isinstance(provider, ConfiguredProvider) and isinstance(provider.inner, Loadable):
        return provider.inner
    return None


class GpuGate:
    """Holds the device semaphores of this host. A model whose provider needs a GPU slot runs
    inside a slot of its device (``gpu_device`` of its spec, default 0); remote models never
    take one. Waiters are served by priority rank (the partition's place in ``partitions``).

    With ``admission`` (and the :class:`ProviderLoader` it was built with), a :class:`Loadable`
    model is admitted inside the slot: its ``estimated_bytes`` are checked against the device's
    room, idle models are unloaded to make room, and a model that cannot fit fails the task with
    ``insufficient_vram`` (final, not retried). On a host with no semaphore for the device (no
    GPU) the model is admitted as a CPU model (need 0): never refused, still unloaded when idle.
    """

    def __init__(
        self,
        *,
        semaphores: Mapping[int, Semaphore],
        partitions: Sequence[str],
        slot_timeout_s: float = 600.0,
        admission: Admission | None = None,
        loader: ProviderLoader | None = None,
    ) -> None:
        if (admission is None) != (loader is None):
            raise ValueError("admission and loader (the one admission was built with) go together")
        self._semaphores = dict(semaphores)
        self._ranks = {name: i for i, name in enumerate(partitions)}
        self._timeout = slot_timeout_s
        self._admission = admission
        self._loader = loader
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
        async with contextlib.AsyncExitStack() as stack:
            if semaphore is None:
                # no such GPU on this host (a CPU build of a local model): nothing to share
                if binding.name not in self._warned:
                    self._warned.add(binding.name)
                    log.warning(
                        "no GPU semaphore for a local model",
                        extra={"model": binding.name, "device": device},
                    )
            else:
                timeout = self._timeout
                if deadline_s is not None:
                    timeout = max(0.0, min(timeout, deadline_s))
                rank = self._ranks.get(partition, len(self._ranks))
                await stack.enter_async_context(
                    semaphore.slot(priority=rank, holder_id=holder_id, timeout=timeout)
                )
            await self._admit(stack, binding, device, on_gpu=semaphore is not None)
            yield

    async def _admit(
        self, stack: contextlib.AsyncExitStack, binding: ModelBinding, device: int, *, on_gpu: bool
    ) -> None:
        model = loadable(binding.provider)
        if self._admission is None or self._loader is None or model is None:
            return  # the provider loads itself on its first generation
        self._loader.bind(binding.name, model)
        need = model.estimated_bytes() if on_gpu else 0
        await stack.enter_async_context(
            self._admission.use(binding.name, need_bytes=need, device=device)
        )
        if not model.loaded:
            # admission counted this name loaded, but by a provider a reload has since replaced
            await model.load()
