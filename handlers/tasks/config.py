"""The task worker's configuration."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sop_llm.handlers.policy import RetryPolicy
from sop_llm.streams.durability import Durability
from sop_llm.streams.keys import Keys
from sop_llm.streams.retention import Retention
from sop_llm.streams.urlguard import AllowList


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    consumer: str
    pools: Sequence[str]
    partitions: Sequence[str]
    slots: int | None = None
    """Tasks running at once per pool at most (``None``: as many as its models' slots, each
    model's being its concurrency)."""
    pool_slots: Mapping[str, int] = field(default_factory=dict)
    """``slots`` per pool, where one needs a cap of its own."""
    block_ms: int = 1000
    aging_ms: int = 30_000
    aging_check_ms: int = 1_000
    lease_ttl_ms: int = 10_000
    reclaim_interval_ms: int = 2_000
    max_attempts: int = 3
    status_ttl_s: int = 86_400
    max_prompt_bytes: int = 1 << 20
    max_metadata_bytes: int = 16 << 10
    max_entry_bytes: int = 4 << 20
    """An entry bigger than this is dead-lettered by its size, never loaded by a read."""
    read_budget_bytes: int = 16 << 20
    """A read stops once its entries add up to this many bytes."""
    shutdown_grace_s: float = 30.0
    retry_poll_ms: int = 250
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    retention: Retention = field(default_factory=Retention)
    trim_interval_s: float = 60.0
    trace_content: bool = False
    tokens_ttl_s: int = 3600
    durability: Durability = field(default_factory=Durability)
    """Replicas each batch of terminal writes waits for before its slots are freed."""
    webhook_allow: AllowList | None = None
    """Checks a plain-XADD task's ``webhook_url`` at intake against the SSRF rules (no name
    lookup: that stays at delivery), letting these hosts through; ``None``: no check (the
    sender still checks at delivery)."""
    unknown_model_grace_s: float = 30.0
    """How long entries parked for a model this worker does not serve (removed since) wait
    before the worker ends them ``model_not_found``."""

    def __post_init__(self) -> None:
        caps = [self.slots, *self.pool_slots.values()]
        if any(c is not None and c < 1 for c in caps):
            raise ValueError("a pool needs at least one slot")

    def pool_cap(self, pool: str) -> int | None:
        return self.pool_slots.get(pool, self.slots)

    def streams(self, keys: Keys) -> list[str]:
        """Task partitions in read order: priority-major, pools interleaved."""
        return [keys.tasks(pool, part) for part in self.partitions for pool in self.pools]
