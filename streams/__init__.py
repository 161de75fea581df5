"""Redis Streams layer: names, topology, the producer SDK, dispatch, leases and outcomes.

``__all__`` names what a service may rely on (the producer side); dispatch, leases, outcomes and
the rest are the worker's internals, imported from their own modules.
"""

from sop_llm.streams.control import CancelOutcome
from sop_llm.streams.keys import DEFAULT_NAMESPACE, DEFAULT_PARTITIONS, DEFAULT_POOL, Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from sop_llm.streams.status import read_status

__all__ = [
    "DEFAULT_NAMESPACE",
    "DEFAULT_PARTITIONS",
    "DEFAULT_POOL",
    "CancelOutcome",
    "Keys",
    "Producer",
    "ProducerConfig",
    "read_status",
]
