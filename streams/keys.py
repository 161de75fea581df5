"""Every Redis name sop-llm uses, built in one place.

All keys of a namespace share the hash tag ``{<namespace>}`` so the multi-key Lua scripts stay
legal on Redis Cluster; a second namespace is a full, isolated copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

TASK_GROUP: Final = "workers"
WEBHOOK_GROUP: Final = "webhook-senders"

DEFAULT_NAMESPACE: Final = "sop"
DEFAULT_POOL: Final = "default"
DEFAULT_PARTITIONS: Final = ("high", "normal", "low")

# status-hash fields
F_STATE: Final = "state"
F_TASK_ID: Final = "task_id"
F_MODEL: Final = "model"
F_STREAM: Final = "stream"
F_ENTRY_ID: Final = "entry_id"
F_CREATED_AT: Final = "created_at"
F_STARTED_AT: Final = "started_at"
F_FINISHED_AT: Final = "finished_at"
F_ATTEMPTS: Final = "attempts"
F_WORKER: Final = "worker"
F_RESULT: Final = "result"
F_DUPLICATE_OF: Final = "duplicate_of"
# webhook delivery log, written by the webhook sender into the task's status hash
F_WEBHOOK_STATE: Final = "webhook_state"  # pending | delivered | failed
F_WEBHOOK_ATTEMPTS: Final = "webhook_attempts"
F_WEBHOOK_LAST_STATUS: Final = "webhook_last_status"  # HTTP status code, or "" when none came back
F_WEBHOOK_LAST_ERROR: Final = "webhook_last_error"  # error class of the last failed attempt
F_REPLY_TO: Final = "reply_to"
F_WEBHOOK_URL: Final = "webhook_url"
F_CANCEL_REQUESTED: Final = "cancel_requested"
F_ERRORS: Final = "errors"  # JSON list of the errors of earlier attempts
F_RETRY_AT: Final = "retry_at"

PARKED_CONSUMER: Final = "~parked"
"""The consumer that owns parked entries in the task group (no worker may take this name)."""

_NAMESPACE_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")
_PLAIN: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def _escape(name: str) -> str:
    """``name`` with every character outside ``[A-Za-z0-9._-]`` as ``%XX`` (its UTF-8 bytes), so
    that no model name can reach into another key."""
    return "".join(c if c in _PLAIN else "".join(f"%{b:02X}" for b in c.encode()) for c in name)


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builder for one namespace."""

    namespace: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        if not _NAMESPACE_RE.match(self.namespace):
            raise ValueError(f"invalid namespace {self.namespace!r}")

    @property
    def prefix(self) -> str:
        return "{" + self.namespace + "}"

    def tasks(self, pool: str, partition: str) -> str:
        return f"{self.prefix}:tasks:{pool}:{partition}"

    @property
    def tasks_delayed(self) -> str:
        """Sorted set of task retries waiting for their time (score: due, ms since the epoch)."""
        return f"{self.prefix}:tasks:delayed"

    @property
    def control(self) -> str:
        """Control events (``task.cancel``) every worker reads."""
        return f"{self.prefix}:control"

    @property
    def reply_streams(self) -> str:
        """Set of the ``reply_to`` names in use, so their result streams can be trimmed."""
        return f"{self.prefix}:reply-streams"

    @property
    def trim_lock(self) -> str:
        return f"{self.prefix}:lock:trim"

    @property
    def results(self) -> str:
        return f"{self.prefix}:results"

    def results_for(self, reply_to: str) -> str:
        return f"{self.prefix}:results:{reply_to}"

    @property
    def webhooks(self) -> str:
        return f"{self.prefix}:webhooks"

    @property
    def webhooks_delayed(self) -> str:
        return f"{self.prefix}:webhooks:delayed"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def webhooks_dead(self) -> str:
        return f"{self.prefix}:webhooks:dead"

    def parked(self, pool: str, model: str) -> str:
        """Sorted set of a pool's entries waiting for ``model`` to have a free slot on some
        worker (score: see ``streams/dispatch.py``); the entries sit in the group's pending list
        under :data:`PARKED_CONSUMER` meanwhile."""
        return f"{self.prefix}:parked:{pool}:{_escape(model)}"

    def parked_models(self, pool: str) -> str:
        """Set of the models that have (or recently had) parked entries in ``pool``."""
        return f"{self.prefix}:parked-models:{pool}"

    def wake(self, pool: str) -> str:
        """Stream that wakes a pool's idle workers when an entry is parked."""
        return f"{self.prefix}:wake:{pool}"

    def task(self, task_id: str) -> str:
        return f"{self.prefix}:task:{task_id}"

    def task_tokens(self, task_id: str) -> str:
        """A streaming task's token deltas: a family of its own, so that no task id (``X:tokens``
        is a valid one) can name another task's token stream or status record."""
        return f"{self.prefix}:tokens:{task_id}"

    def idem(self, key: str) -> str:
        return f"{self.prefix}:idem:{key}"

    @property
    def models(self) -> str:
        return f"{self.prefix}:models"

    def gpu(self, host: str, index: int) -> str:
        return f"{self.prefix}:gpu:{host}:{index}"

    def gpu_waiters(self, host: str, index: int) -> str:
        """Sorted set of tasks waiting for the device (score: priority rank, then arrival)."""
        return f"{self.gpu(host, index)}:waiters"

    def gpu_waiter_leases(self, host: str, index: int) -> str:
        return f"{self.gpu(host, index)}:waiters:leases"

    def gpu_seq(self, host: str, index: int) -> str:
        return f"{self.gpu(host, index)}:seq"

    def gpu_wake(self, host: str, index: int) -> str:
        return f"{self.gpu(host, index)}:wake"

    def worker(self, consumer: str) -> str:
        return f"{self.prefix}:worker:{consumer}"

    @property
    def workers(self) -> str:
        """Zset: the consumers holding a lease, scored by when it lapses (ms): what lists the
        live workers without SCAN (which an ACL for one namespace does not allow)."""
        return f"{self.prefix}:workers"

    @property
    def all_pattern(self) -> str:
        """SCAN pattern matching every key of the namespace."""
        return self.prefix.replace("{", "\\{").replace("}", "\\}") + ":*"

    def derived_task_id(self, pool: str, partition: str, entry_id: str) -> str:
        """The documented id of a task published without ``task_id``:
        ``<pool>.<partition>.<entry id>``."""
        return f"{pool}.{partition}.{entry_id}"

    def parse_tasks_stream(self, stream: str) -> tuple[str, str]:
        """``(pool, partition)`` of a task-partition stream name. Raises ``ValueError``."""
        head = f"{self.prefix}:tasks:"
        if not stream.startswith(head):
            raise ValueError(f"{stream!r} is not a task stream of namespace {self.namespace!r}")
        pool, _, partition = stream[len(head) :].partition(":")
        if not pool or not partition:
            raise ValueError(f"{stream!r} is not a task stream of namespace {self.namespace!r}")
        return pool, partition
