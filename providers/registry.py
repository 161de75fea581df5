"""Model name → provider, with the model's concurrency (its slots on a worker)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field

from sop_llm.providers.base import Provider
from sop_llm.schemas.errors import ModelNotFoundError
from sop_llm.schemas.models import ModelSpec


@dataclass(slots=True)
class ModelBinding:
    name: str
    provider: Provider
    pool: str
    concurrency: int
    spec: ModelSpec | None = None
    _users: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()

    @property
    def needs_gpu_slot(self) -> bool:
        return self.provider.capabilities.needs_gpu_slot

    @property
    def reserved(self) -> int:
        """Slots beyond ``concurrency`` for the pool's first partition only."""
        return self.provider.capabilities.reserved

    def in_use(self) -> _InUse:
        """Held by each task that runs on this binding (its provider stays open meanwhile)."""
        return _InUse(self)

    async def idle(self) -> None:
        """Return once no task runs on this binding."""
        await self._idle.wait()


class _InUse:
    __slots__ = ("_binding",)

    def __init__(self, binding: ModelBinding) -> None:
        self._binding = binding

    def __enter__(self) -> None:
        b = self._binding
        b._users += 1
        b._idle.clear()

    def __exit__(self, *exc: object) -> None:
        b = self._binding
        b._users -= 1
        if b._users == 0:
            b._idle.set()


class ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, ModelBinding] = {}

    def register(
        self,
        name: str,
        provider: Provider,
        *,
        pool: str = "default",
        concurrency: int | None = None,
        spec: ModelSpec | None = None,
    ) -> ModelBinding | None:
        """Bind ``name``; returns the binding it replaced, if any (tasks that already resolved
        it finish on it: the caller closes its provider once they have)."""
        n = concurrency or provider.capabilities.max_concurrency
        if n < 1:
            raise ValueError("concurrency must be >= 1")
        old = self._models.get(name)
        self._models[name] = ModelBinding(name, provider, pool, n, spec)
        return old

    def unregister(self, name: str) -> ModelBinding | None:
        """Forget ``name``; returns its binding (``None`` when it was not registered)."""
        return self._models.pop(name, None)

    def get(self, name: str) -> ModelBinding | None:
        return self._models.get(name)

    def resolve(self, name: str) -> ModelBinding:
        """Raises :class:`ModelNotFoundError` for a model this worker does not serve."""
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFoundError(
                f"model: {name!r} is not registered (known: {known})"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._models)

    def bindings(self, pools: Iterable[str] | None = None) -> list[ModelBinding]:
        wanted = set(pools) if pools is not None else None
        return [b for b in self._models.values() if wanted is None or b.pool in wanted]
