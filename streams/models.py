"""Models registered at run time: the ``{ns}:models`` hash (name -> ModelSpec JSON).

Every change also bumps the hash field ``__version__`` in the same transaction, so a worker can
tell cheaply (one HGET) whether to reload. Model names start with a letter or digit, so the
field never collides with a model.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final

from pydantic import ValidationError
from redis.asyncio import Redis

from schemas.models import ModelSpec
from streams.keys import Keys

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
