"""The task worker's configuration, and one pool's lane (reader, reclaimer, slot budget)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from handlers.policy import RetryPolicy
from streams.dispatch import PriorityReader
from streams.keys import Keys
from streams.leases import Reclaimer
from streams.retention import Retention


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    consumer: str
    pools: Sequence[str]
    partitions: Sequence[str]
    slots: int
    block_ms: int = 1000
    aging_ms: int = 30_000
    aging_check_ms: int = 1_000
    lease_ttl_ms: int = 10_000
    reclaim_interval_ms: int = 2_000
    max_attempts: int = 3
    status_ttl_s: int = 86_400
    max_prompt_bytes: int = 1 << 20
    max_metadata_bytes: int = 16 << 10
    shutdown_grace_s: float = 30.0
    retry_poll_ms: int = 250
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    retention: Retention = field(default_factory=Retention)
    trim_interval_s: float = 60.0
    trace_content: bool = False
    tokens_ttl_s: int = 3600
    fast_link: bool = True
    """Hot commands over lean connections of the worker's own (``streams/link.py``), where the
    client allows one."""
    pool_slots: Mapping[str, int] = field(default_factory=dict)
    """Slots per pool (default ``slots``): a pool whose tasks are stuck (a provider that hangs)
    can fill its own slots, never another pool's."""

    def streams(self, keys: Keys) -> list[str]:
        """Task partitions in read order: priority-major, pools interleaved."""
        return [keys.tasks(pool, part) for part in self.partitions for pool in self.pools]


MAX_BEGINS = 4
"""Begin round trips in flight per pool: enough to keep Redis busy while the next batches are
read and prepared, few enough that a slow Redis is felt as back-pressure at once."""


@dataclass(slots=True)
class Lane:
    """One pool: its partitions' reader and reclaimer, and its own slot budget."""

    pool: str
    reader: PriorityReader
    reclaimer: Reclaimer
    slots: int
    inflight: set[asyncio.Task[None]] = field(default_factory=set)
    admitting: int = 0
    """Entries of read batches whose begin round trip is under way and that will run as
    tasks (they hold slots). The entries of instant models hold none: their outcome is computed
    already, and their begin writes it."""
    begins: int = 0
    """Read batches whose begin round trip is under way."""

    def free(self) -> int:
        return self.slots - len(self.inflight) - self.admitting

    def can_read(self) -> bool:
        """A free slot, and fewer than ``MAX_BEGINS`` batches waiting for their begin."""
        return self.free() > 0 and self.begins < MAX_BEGINS

    def read_size(self) -> int:
        """How many entries the next read may take: the free slots, at most half of all, so
        that a batch is read and prepared while the one before it is being begun."""
        return min(self.free(), max(1, self.slots // 2))
