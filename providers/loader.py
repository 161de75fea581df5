"""Specs -> a live registry: build providers, swap changed ones, retire removed ones.

:class:`ModelLoader` owns the providers it built. ``apply(specs)`` makes the registry match the
specs of the pools this worker serves: new models are built (a GGUF file loads in a thread),
changed specs are rebuilt and swapped in, and models gone from the specs are unregistered.
A replaced or removed provider is closed once the tasks that already hold it have finished
(all of its concurrency permits are back), or after ``retire_timeout_s``. Models registered
by someone else (the built-in ``echo``) are left alone unless a spec of the same name arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from sop_llm.providers.base import Closeable
from sop_llm.providers.configured import ConfiguredProvider
from sop_llm.providers.factory import ModelConfigError, build_provider
from sop_llm.providers.registry import ModelBinding, ModelRegistry
from sop_llm.schemas.models import ModelSpec

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadReport:
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # name -> reason (no secrets)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.replaced or self.removed)


class ModelLoader:
    """Keeps ``registry`` in step with model specs. An async context manager: leaving it
    unregisters and closes every provider it built."""

    def __init__(
        self,
        *,
        registry: ModelRegistry,
        env: Mapping[str, str],
        pools: Collection[str] | None = None,
        echo_tokens_per_s: float = 0.0,
        load_timeout_s: float = 600.0,
        retire_timeout_s: float = 300.0,
        on_retire: Callable[[str], None] | None = None,
    ) -> None:
        """``on_retire(name)``: called once a removed or replaced model's provider is closed."""
        self._on_retire = on_retire
        self._registry = registry
        self._env = env
        self._pools = None if pools is None else frozenset(pools)
        self._echo_tokens_per_s = echo_tokens_per_s
        self._load_timeout_s = load_timeout_s
        self._retire_timeout_s = retire_timeout_s
        self._specs: dict[str, ModelSpec] = {}

    async def __aenter__(self) -> ModelLoader:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def specs(self) -> dict[str, ModelSpec]:
        return dict(self._specs)

    async def apply(self, specs: Sequence[ModelSpec], *, strict: bool = False) -> LoadReport:
        """Make the registry serve ``specs`` (those of this worker's pools).

        A spec that cannot be built is reported in ``failed`` and skipped (its previous
        version, if any, keeps serving); with ``strict`` it raises :class:`ModelConfigError`
        instead, after building nothing. Never logs a key.
        """
        wanted = {s.name: s for s in specs if self._pools is None or s.pool in self._pools}
        report = LoadReport()
        built: dict[str, ConfiguredProvider] = {}
        for name, spec in wanted.items():
            if self._specs.get(name) == spec:
                continue
            try:
                built[name] = await self._build(spec)
            except (ModelConfigError, TimeoutError) as exc:
                reason = str(exc) or "loading timed out"
                report.failed[name] = reason
                log.warning("model not loaded", extra={"model": name, "error": reason})
        if strict and report.failed:
            await asyncio.gather(*(_close(p) for p in built.values()))
            raise ModelConfigError("; ".join(report.failed.values()))
        retired: list[ModelBinding] = []
        for name, provider in built.items():
            spec = wanted[name]
            old = self._registry.register(name, provider, pool=spec.pool, spec=spec)
            (report.replaced if name in self._specs else report.added).append(name)
            self._specs[name] = spec
            if old is not None:
                retired.append(old)
        for name in [n for n in self._specs if n not in wanted]:
            old = self._registry.unregister(name)
            del self._specs[name]
            report.removed.append(name)
            if old is not None:
                retired.append(old)
        if retired:
            await asyncio.gather(*(self._retire(b) for b in retired))
        if report.changed:
            log.info(
                "models loaded",
                extra={"added": report.added, "replaced": report.replaced,
                       "removed": report.removed},
            )  # fmt: skip
        return report

    async def _build(self, spec: ModelSpec) -> ConfiguredProvider:
        echo = self._echo_tokens_per_s
        if spec.provider != "llama_cpp":
            return build_provider(spec, env=self._env, echo_tokens_per_s=echo)
        # loading a GGUF file blocks for seconds: off the event loop
        async with asyncio.timeout(self._load_timeout_s):
            return await asyncio.to_thread(build_provider, spec, env=self._env)

    async def _retire(self, binding: ModelBinding) -> None:
        """Close ``binding``'s provider once its in-flight tasks are done (or the wait ends)."""
        try:
            async with asyncio.timeout(self._retire_timeout_s):
                await binding.idle()
        except TimeoutError:
            log.warning("closing a model with tasks still running", extra={"model": binding.name})
        await _close(binding.provider)
        if self._on_retire is not None:
            self._on_retire(binding.name)

    async def close(self) -> None:
        """Unregister and close every provider this loader built."""
        bindings = [self._registry.unregister(name) for name in list(self._specs)]
        self._specs.clear()
        await asyncio.gather(*(_close(b.provider) for b in bindings if b is not None))


async def _close(provider: object) -> None:
    if isinstance(provider, Closeable):
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(10):
                await provider.aclose()


async def load_registry(
    specs: Sequence[ModelSpec],
    *,
    env: Mapping[str, str],
    registry: ModelRegistry | None = None,
    pools: Collection[str] | None = None,
    echo_tokens_per_s: float = 0.0,
) -> tuple[ModelRegistry, ModelLoader]:
    """A registry serving ``specs`` (strict: raises :class:`ModelConfigError` naming every spec
    that cannot be built), and the loader that owns its providers (close it on shutdown;
    ``apply`` it again with new specs to reload)."""
    registry = registry if registry is not None else ModelRegistry()
    loader = ModelLoader(
        registry=registry, env=env, pools=pools, echo_tokens_per_s=echo_tokens_per_s
    )
    await loader.apply(specs, strict=True)
    return registry, loader
