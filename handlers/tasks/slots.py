"""The one owner of slot state: what may start here now.

Each model has as many slots as its concurrency (read from the registry at every look, so a
model reloaded with another figure gets it at once); a pool may also have a cap on the tasks it
runs at once. A model may also have *reserved* slots (a batching model's spare sequence): only
a task of the pool's first partition takes one, and only once the model's other slots are all
in use, so that a ``high`` task arriving at a full model starts at once. A task holds its
:class:`ModelSlot` from the moment its entry is taken for it until its outcome is written; the
slot is released once, when the task's ``async with`` ends.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from types import TracebackType

INVALID_MODEL = ""
"""The slots of entries that name no model this worker knows (or none at all): they only fail,
and take few slots so that a flood of them cannot hold up good tasks."""
INVALID_SLOTS = 8


class ModelSlot:
    """One task's place on its model and pool."""

    __slots__ = ("_budget", "_released", "model", "pool", "reserved")

    def __init__(self, budget: SlotBudget, pool: str, model: str, *, reserved: bool) -> None:
        self._budget = budget
        self.pool = pool
        self.model = model
        self.reserved = reserved
        self._released = False

    async def __aenter__(self) -> ModelSlot:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._budget._release(self)


class SlotBudget:
    def __init__(
        self,
        *,
        capacity: Callable[[str], int],
        pool_caps: Mapping[str, int | None],
        reserved: Callable[[str], int] = lambda model: 0,
    ) -> None:
        """``capacity(model)``: the model's slots (its concurrency; 0 when unknown);
        ``reserved(model)``: its slots kept for the first partition (not under the pool cap)."""
        self._capacity = capacity
        self._reserved = reserved
        self._caps = dict(pool_caps)
        self._models: collections.Counter[str] = collections.Counter()
        self._pools: collections.Counter[str] = collections.Counter()
        self._reserves: collections.Counter[str] = collections.Counter()
        self._listeners: list[Callable[[ModelSlot], None]] = []

    def listen(self, callback: Callable[[ModelSlot], None]) -> None:
        """Call ``callback`` with each slot as it is released."""
        self._listeners.append(callback)

    def capacity(self, model: str) -> int:
        return INVALID_SLOTS if model == INVALID_MODEL else self._capacity(model)

    def free(self, pool: str, model: str) -> int:
        free = self.capacity(model) - self._models[model]
        cap = self._caps.get(pool)
        if cap is not None:
            free = min(free, cap - self._pools[pool])
        return max(0, free)

    def free_reserved(self, model: str) -> int:
        """Reserved slots of ``model`` a first-partition task may take now (none while one of
        its other slots is free: those go first)."""
        if model == INVALID_MODEL or self._capacity(model) > self._models[model]:
            return 0
        return max(0, self._reserved(model) - self._reserves[model])

    def take(self, pool: str, model: str, *, first: bool = False) -> ModelSlot | None:
        """A slot for a task of ``model`` in ``pool``, or ``None`` when none is free. ``first``:
        the task is of the pool's first partition, and may take a reserved slot."""
        if self.free(pool, model) > 0:
            self._models[model] += 1
            self._pools[pool] += 1
            return ModelSlot(self, pool, model, reserved=False)
        if first and self.free_reserved(model) > 0:
            self._reserves[model] += 1
            return ModelSlot(self, pool, model, reserved=True)
        return None

    def _release(self, slot: ModelSlot) -> None:
        if slot.reserved:
            self._reserves[slot.model] -= 1
        else:
            self._models[slot.model] -= 1
            self._pools[slot.pool] -= 1
        for callback in self._listeners:
            callback(slot)
