"""Model name → provider, with a per-model concurrency limit."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from providers.base import Provider
from schemas.errors import ModelNotFoundError


@dataclass(slots=True)
class ModelBinding:
    name: str
    provider: Provider
    pool: str
    limit: asyncio.Semaphore
    concurrency: int


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
    ) -> None:
        n = concurrency or provider.capabilities.max_concurrency
        if n < 1:
            raise ValueError("concurrency must be >= 1")
        self._models[name] = ModelBinding(name, provider, pool, asyncio.Semaphore(n), n)

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
