"""Redis Streams layer: names, topology, the producer SDK, dispatch, leases and outcomes."""

from streams.dispatch import PoolReader
from streams.entries import Entry
from streams.keys import (
    DEFAULT_NAMESPACE,
    DEFAULT_PARTITIONS,
    DEFAULT_POOL,
    TASK_GROUP,
    WEBHOOK_GROUP,
    Keys,
)
from streams.leases import Lease, Reclaimer
from streams.outcome import BeginReply, Finish, Outcomes, Start
from streams.producer import Producer, ProducerConfig
from streams.status import read_status
from streams.topology import Backoff, ensure_groups

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
