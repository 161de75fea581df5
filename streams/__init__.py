"""Redis Streams layer: names, topology, the producer SDK, dispatch, leases and outcomes."""

from sop_llm.streams.dispatch import PoolReader
from sop_llm.streams.entries import Entry
from sop_llm.streams.keys import (
    DEFAULT_NAMESPACE,
    DEFAULT_PARTITIONS,
    DEFAULT_POOL,
    TASK_GROUP,
    WEBHOOK_GROUP,
    Keys,
)
from sop_llm.streams.leases import Lease, Reclaimer
from sop_llm.streams.outcome import BeginReply, Finish, Outcomes, Start
from sop_llm.streams.producer import Producer, ProducerConfig
from sop_llm.streams.status import read_status
from sop_llm.streams.topology import Backoff, ensure_groups

__all__ = [
    "DEFAULT_NAMESPACE",
    "DEFAULT_PARTITIONS",
    "DEFAULT_POOL",
    "TASK_GROUP",
    "WEBHOOK_GROUP",
    "Backoff",
    "BeginReply",
    "Entry",
    "Finish",
    "Keys",
    "Lease",
    "Outcomes",
    "PoolReader",
    "Producer",
    "ProducerConfig",
    "Reclaimer",
    "Start",
    "ensure_groups",
    "read_status",
]
