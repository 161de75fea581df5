"""Model-placement admission: load a local model only where it fits in VRAM.

Before a model is loaded its need is estimated (:func:`estimate_need`: the GGUF bytes of the
offloaded layers plus the KV cache of its context) and compared with the *room* on a device:
``min(free - reserve, total * max_percent / 100 - used)``. When no device has room, the least
recently used idle models are unloaded (only where that can make room); when even that cannot,
the task is refused with :class:`InsufficientVramError` instead of crashing the process on an
out-of-memory error. Models unused for ``idle_unload_s`` are unloaded by :meth:`Admission.run`.

Loads and evictions are serialised within the process. Processes sharing a device see each
other's allocations only through NVML, so load a model while holding that device's GPU slot
(permits 1) when several processes can load onto one device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final, Protocol

from sop_llm.gpu.nvml import DeviceMemory, MemoryReader
from sop_llm.schemas.errors import ErrorCode, SopError

log = logging.getLogger(__name__)

MIB: Final = 1024 * 1024


class InsufficientVramError(SopError):
    """The model does not fit on any device, even after unloading every idle model.

    Final: the task fails with ``insufficient_vram`` (a bigger device or a smaller model is the
    fix, not another attempt)."""

    code = ErrorCode.INSUFFICIENT_VRAM
    reason: Final = "insufficient_vram"

    def __init__(
        self, message: str, *, model: str, need_bytes: int, available_bytes: int | None
    ) -> None:
        super().__init__(message)
        self.model = model
        self.need_bytes = need_bytes
        self.available_bytes = available_bytes


class ModelLoadTimeoutError(SopError, TimeoutError):
    """Loading (or making room for) a model took longer than ``load_timeout_s``."""

    code = ErrorCode.TIMEOUT


def _mib(n: int) -> str:
    return f"{n / MIB:.0f} MiB" if abs(n) >= 10 * MIB else f"{n / MIB:.2f} MiB"


def estimate_need(
    *,
    gguf_bytes: int,
    n_layers: int,
    n_gpu_layers: int,
    n_ctx: int,
    n_embd: int,
    n_layer: int,
    kv_bytes_per_elem: float = 2,
) -> int:
    """VRAM bytes a llama.cpp model needs: its weights on the GPU plus their KV cache.

    ``n_layers``: the model's block count; ``n_gpu_layers``: layers offloaded (negative, or at
    least ``n_layers``: all of them; 0: a CPU model, which needs nothing). ``n_layer``: the
    layers that keep a KV cache (usually ``n_layers``), scaled by the same offloaded share.
    ``n_embd``: the width of K (and of V) per layer and token; with grouped-query attention
    pass ``n_embd * n_head_kv / n_head``. ``kv_bytes_per_elem``: 2 for an f16 cache, about
    1.06 for q8_0. Compute buffers are not counted: ``vram_reserve_mb`` covers them.
    """
    if min(gguf_bytes, n_ctx, n_embd, n_layer) < 0 or n_layers < 1 or kv_bytes_per_elem <= 0:
        raise ValueError("sizes must be >= 0, n_layers >= 1, kv_bytes_per_elem > 0")
    share = 1.0 if n_gpu_layers < 0 else min(n_gpu_layers, n_layers) / n_layers
    weights = gguf_bytes * share
    kv = 2 * n_ctx * n_embd * kv_bytes_per_elem * math.ceil(n_layer * share)
    return math.ceil(weights + kv)


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    """``max_vram_usage_percent``: the share of a device's memory models may fill, counting what
    others use; ``vram_reserve_mb``: memory always left free; ``idle_unload_s``: unload a model
    unused this long (0: never). The timeouts bound each loader and NVML call."""

    max_vram_usage_percent: float = 90.0
    vram_reserve_mb: int = 512
    idle_unload_s: float = 900.0
    load_timeout_s: float = 600.0
    unload_timeout_s: float = 60.0
    read_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.max_vram_usage_percent <= 100:
            raise ValueError("max_vram_usage_percent must be within (0, 100]")
        if self.vram_reserve_mb < 0 or self.idle_unload_s < 0:
            raise ValueError("vram_reserve_mb and idle_unload_s must be >= 0")

    def room(self, d: DeviceMemory) -> int:
        """Bytes a new model may take on ``d`` now."""
        cap = d.total_bytes * self.max_vram_usage_percent / 100 - d.used_bytes
        return int(min(d.free_bytes - self.vram_reserve_mb * MIB, cap))


class DeviceLoader(Protocol):
    """Loads and frees a local model; ``device`` ``None`` means the CPU. Failures raise a
    :class:`SopError` (a provider's own error tree), translated at the adapter."""

    async def load(self, model: str, device: int | None) -> None: ...

    async def unload(self, model: str, device: int | None) -> None: ...


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model: str
    device: int | None
    need_bytes: int
    in_use: int
    idle_s: float


@dataclass(slots=True)
class _Entry:
    model: str
    device: int | None
    need_bytes: int
    last_used: float
    in_use: int = 0


class Admission:
    """The models loaded by this process, least recently used first (see the module docstring)."""

    def __init__(
        self,
        *,
        reader: MemoryReader,
        loader: DeviceLoader,
        config: AdmissionConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reader = reader
        self._loader = loader
        self._config = config
        self._clock = clock
        self._models: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = asyncio.Lock()

    def loaded(self) -> list[LoadedModel]:
        now = self._clock()
        return [
            LoadedModel(e.model, e.device, e.need_bytes, e.in_use, max(0.0, now - e.last_used))
            for e in self._models.values()
        ]

    @contextlib.asynccontextmanager
    async def use(
        self, model: str, *, need_bytes: int, device: int | None = None
    ) -> AsyncIterator[LoadedModel]:
        """Have ``model`` loaded (loading it, after making room, if needed) and keep it from
        being unloaded for the body of the ``async with``.

        ``need_bytes`` (see :func:`estimate_need`) of 0 is a CPU model, loaded with no VRAM
        check. ``device`` pins the model to one device index; ``None`` picks the device with the
        most room. Raises :class:`InsufficientVramError`, :class:`ModelLoadTimeoutError`, and
        whatever the loader raises.
        """
        entry = self._models.get(model)
        if entry is None:
            entry = await self._admit(model, need_bytes, device)
        else:
            entry.in_use += 1  # no await since the lookup: an eviction cannot pick it now
        try:
            yield LoadedModel(model, entry.device, entry.need_bytes, entry.in_use, 0.0)
        finally:
            entry.in_use -= 1
            entry.last_used = self._clock()
            if self._models.get(model) is entry:
                self._models.move_to_end(model)

    def forget(self, model: str) -> None:
        """``model``'s provider was retired and closed (a model removed or replaced at run
        time): it holds no memory any more, and a new one loads afresh."""
        self._models.pop(model, None)

    async def unload_idle(self) -> list[str]:
        """Unload the models unused for ``idle_unload_s``; returns their names."""
        if self._config.idle_unload_s <= 0:
            return []
        done = []
        async with self._locked():
            cutoff = self._clock() - self._config.idle_unload_s
            for e in list(self._models.values()):
                if e.in_use == 0 and e.last_used <= cutoff:
                    await self._unload(e)
                    done.append(e.model)
        return done

    async def run(self, stop: asyncio.Event) -> None:
        """Unload idle models until ``stop`` is set (checks every quarter of the idle time)."""
        every = min(self._config.idle_unload_s / 4, 60.0) or 60.0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every)
            if stop.is_set():
                break
            try:
                await self.unload_idle()
            except (SopError, OSError) as exc:  # tried again next round; the model stays counted
                log.warning("idle model unload failed", extra={"error": repr(exc)})

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        cfg = self._config
        try:
            async with asyncio.timeout(cfg.load_timeout_s + cfg.unload_timeout_s):
                await self._lock.acquire()
        except TimeoutError:
            raise ModelLoadTimeoutError("timed out waiting for another model load") from None
        try:
            yield
        finally:
            self._lock.release()

    async def _admit(self, model: str, need: int, device: int | None) -> _Entry:
        async with self._locked():
            entry = self._models.get(model)  # loaded by someone else while we waited
            if entry is None:
                target = None if need <= 0 else await self._make_room(model, need, device)
                await self._load(model, target)
                entry = _Entry(model, target, max(need, 0), self._clock())
                self._models[model] = entry
            entry.in_use += 1
            return entry

    async def _make_room(self, model: str, need: int, device: int | None) -> int:
        """A device index where ``need`` bytes fit now, unloading idle models if that helps."""
        cfg = self._config
        devices = await self._read()
        found = [d for d in devices if device is None or d.index == device]
        if not found:
            where = "no GPU" if not devices else f"no GPU device {device}"
            raise InsufficientVramError(
                f"model {model!r} needs {_mib(need)} of VRAM and there is {where}",
                model=model,
                need_bytes=need,
                available_bytes=None,
            )
        best = max(found, key=cfg.room)
        if cfg.room(best) >= need:
            return best.index
        # only evict where it can make enough room, so a refusal leaves the idle models loaded
        for d in sorted(found, key=lambda d: cfg.room(d) + self._idle_bytes(d.index), reverse=True):
            if cfg.room(d) + self._idle_bytes(d.index) < need:
                break
            for victim in [e for e in self._models.values() if e.device == d.index]:
                if victim.in_use:
                    continue
                log.info("unloading idle model for room", extra={"model": victim.model})
                await self._unload(victim)
                fresh = {x.index: x for x in await self._read()}
                if d.index in fresh and cfg.room(fresh[d.index]) >= need:
                    return d.index
        room = cfg.room(best)
        raise InsufficientVramError(
            f"model {model!r} needs {_mib(need)} of VRAM; at most {_mib(max(room, 0))} usable"
            f" on GPU {best.index} (free {_mib(best.free_bytes)}, reserve"
            f" {cfg.vram_reserve_mb} MiB, cap {cfg.max_vram_usage_percent:g}%) and no idle model"
            " to unload would make room",
            model=model,
            need_bytes=need,
            available_bytes=max(room, 0),
        )

    def _idle_bytes(self, index: int) -> int:
        return sum(
            e.need_bytes for e in self._models.values() if e.device == index and not e.in_use
        )

    async def _read(self) -> list[DeviceMemory]:
        try:
            async with asyncio.timeout(self._config.read_timeout_s):
                return await self._reader.read()
        except TimeoutError:
            raise ModelLoadTimeoutError("GPU memory could not be read in time") from None

    async def _load(self, model: str, device: int | None) -> None:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._config.load_timeout_s):
                await self._loader.load(model, device)
        except TimeoutError:
            raise ModelLoadTimeoutError(
                f"model {model!r} did not load within {self._config.load_timeout_s:g} s"
            ) from None
        log.info(
            "model loaded",
            extra={"model": model, "device": device, "load_s": time.monotonic() - started},
        )

    async def _unload(self, entry: _Entry) -> None:
        # out of the table first: a concurrent use() must not pick a model being unloaded
        del self._models[entry.model]
        done = False
        try:
            async with asyncio.timeout(self._config.unload_timeout_s):
                await self._loader.unload(entry.model, entry.device)
            done = True
        except TimeoutError:
            raise ModelLoadTimeoutError(f"model {entry.model!r} did not unload in time") from None
        finally:
            if not done:  # it may still hold memory: keep accounting for it
                self._models[entry.model] = entry
