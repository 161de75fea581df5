"""Models registered at run time: the ``{ns}:models`` hash (name -> ModelSpec JSON).

Every change also bumps the hash field ``__version__`` in the same transaction, so a worker can
tell cheaply (one HGET) whether to reload. Model names start with a letter or digit, so the
field never collides with a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final

from pydantic import ValidationError
from redis.asyncio import Redis

from sop_llm.schemas.models import ModelSpec
from sop_llm.streams.keys import Keys

VERSION_FIELD: Final = "__version__"

# delete a field and bump the version only when something was deleted: -1 when absent
_REMOVE: Final = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  return redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
end
return -1
"""


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    """The hash at one moment: its version, the valid specs, and entries that did not parse
    (name -> reason), which a worker skips and an operator should fix."""

    version: int
    specs: tuple[ModelSpec, ...] = ()
    invalid: dict[str, str] = field(default_factory=dict)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ModelStore:
    def __init__(self, *, client: Redis, keys: Keys, timeout_s: float = 5.0) -> None:
        self._client = client
        self._key = keys.models
        self._timeout_s = timeout_s
        self._remove = client.register_script(_REMOVE)

    async def put(self, spec: ModelSpec) -> int:
        """Add or replace ``spec``; returns the new version."""
        async with asyncio.timeout(self._timeout_s):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(self._key, spec.name, spec.to_wire())
                pipe.hincrby(self._key, VERSION_FIELD, 1)
                _, version = await pipe.execute()
        return int(version)

    async def remove(self, name: str) -> bool:
        """Forget ``name``; ``False`` when it was not registered (the version stays)."""
        async with asyncio.timeout(self._timeout_s):
            removed = await self._remove(keys=[self._key], args=[name, VERSION_FIELD])
        return int(removed) >= 0

    async def get(self, name: str) -> ModelSpec | None:
        """The spec of ``name``, ``None`` when absent. Raises ``ValidationError`` for an entry
        that does not parse."""
        async with asyncio.timeout(self._timeout_s):
            raw = await self._client.hget(self._key, name)
        return None if raw is None else ModelSpec.model_validate_json(raw)

    async def registered(self, names: set[str]) -> set[str]:
        """Those of ``names`` that have a spec here (valid or not), in one command."""
        if not names:
            return set()
        ordered = sorted(names)
        async with asyncio.timeout(self._timeout_s):
            raw = await self._client.hmget(self._key, ordered)
        return {name for name, value in zip(ordered, raw, strict=True) if value is not None}

    async def version(self) -> int:
        async with asyncio.timeout(self._timeout_s):
            raw = await self._client.hget(self._key, VERSION_FIELD)
        return int(raw) if raw is not None else 0

    async def snapshot(self) -> ModelSnapshot:
        """Every spec and the version, read in one command."""
        async with asyncio.timeout(self._timeout_s):
            raw = await self._client.hgetall(self._key)
        version = 0
        specs: list[ModelSpec] = []
        invalid: dict[str, str] = {}
        for k, v in sorted(raw.items()):
            name = _text(k)
            if name == VERSION_FIELD:
                version = int(v)
                continue
            try:
                spec = ModelSpec.model_validate_json(v)
            except ValidationError as exc:
                invalid[name] = f"{exc.error_count()} validation error(s): {exc.errors()[0]['msg']}"
                continue
            if spec.name != name:
                invalid[name] = f"spec is named {spec.name!r}"
                continue
            specs.append(spec)
        return ModelSnapshot(version=version, specs=tuple(specs), invalid=invalid)

    async def changes(
        self, stop: asyncio.Event, *, interval_s: float = 5.0
    ) -> AsyncIterator[ModelSnapshot]:
        """The current snapshot at once, then one each time the version moves, polled every
        ``interval_s`` until ``stop`` is set. Redis errors propagate (the caller backs off)."""
        seen: int | None = None
        while not stop.is_set():
            version = await self.version()
            if version != seen:
                snap = await self.snapshot()
                seen = snap.version
                yield snap
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)


@dataclass(frozen=True, slots=True)
class Pickup:
    """Where the live workers of a pool stand with one model after a change to the store."""

    serving: tuple[str, ...] = ()
    """Workers that serve the model now."""
    pending: tuple[str, ...] = ()
    """Workers that have not taken the store's version yet."""
    refused: tuple[str, ...] = ()
    """Workers that took the version but do not serve the model (its load failed: their log
    says why)."""

    @property
    def settled(self) -> bool:
        return not self.pending


@dataclass(frozen=True, slots=True)
class WorkerModels:
    """What a live worker's lease says of its models."""

    consumer: str
    pools: tuple[str, ...]
    models: tuple[str, ...]
    version: int
    """The model store's version it took last (-1: none yet)."""


async def worker_models(client: Redis, keys: Keys) -> list[WorkerModels]:
    """The live workers of the namespace and the models each serves (file and run time), from
    their leases."""
    now = int(time.time() * 1000)
    found = await client.zrangebyscore(keys.workers, now, "+inf")
    names = [_text(n) for n in found if isinstance(n, bytes | str)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.get(keys.worker(name))
    out = []
    for consumer, raw in zip(names, await pipe.execute() if names else [], strict=True):
        if raw is None:
            continue  # lapsed meanwhile
        try:
            info = json.loads(raw)
            pools = tuple(p for p in str(info.get("pools", "")).split(",") if p)
            models = tuple(m for m in str(info.get("models", "")).split(",") if m)
            version = int(info.get("version", -1))
        except (ValueError, AttributeError):
            continue  # not a lease this version of sop-llm wrote
        out.append(WorkerModels(consumer, pools, models, version))
    return sorted(out, key=lambda w: w.consumer)


async def pickup(client: Redis, keys: Keys, name: str, pool: str, version: int) -> Pickup:
    """Where the live workers of ``pool`` stand with model ``name`` as of store ``version``."""
    serving, pending, refused = [], [], []
    for w in await worker_models(client, keys):
        if pool not in w.pools:
            continue
        if w.version < version:
            pending.append(w.consumer)
        elif name in w.models:
            serving.append(w.consumer)
        else:
            refused.append(w.consumer)
    return Pickup(tuple(serving), tuple(pending), tuple(refused))


async def wait_pickup(
    client: Redis,
    keys: Keys,
    name: str,
    pool: str,
    version: int,
    *,
    timeout_s: float,
    interval_s: float = 0.2,
) -> Pickup:
    """Wait until every live worker of ``pool`` took store ``version`` (a model added is then
    loaded or refused, a model removed is gone). Raises :class:`TimeoutError` naming the
    workers still behind after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = await pickup(client, keys, name, pool, version)
        if state.settled:
            return state
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"workers of pool {pool!r} have not taken the change within {timeout_s:g} s: "
                + ", ".join(state.pending)
            )
        await asyncio.sleep(interval_s)
