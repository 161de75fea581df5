"""Operator actions on webhook deliveries: list the dead ones, send one again.

Used by ``sop-llm webhooks dead`` and ``sop-llm webhooks redeliver <task_id>``; the Redis side
is :mod:`streams.webhook_dead`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sop_llm.schemas.errors import SopError
from sop_llm.streams.client import RedisClient
from sop_llm.streams.keys import Keys
from sop_llm.streams.webhook_dead import (
    DeadDelivery,
    delivery_state,
    find_delivery,
    list_dead_deliveries,
    requeue_delivery,
)


class WebhookNotFoundError(SopError, LookupError):
    """No delivery job of that task is left in the dead letters or the webhooks stream."""


class WebhookBusyError(SopError):
    """The task's delivery is still under way; redelivering would send it twice at once."""


@dataclass(frozen=True, slots=True)
class Redelivery:
    entry_id: str
    delivery_id: str
    from_dead: bool


class WebhookAdmin:
    def __init__(self, *, client: RedisClient, keys: Keys) -> None:
        self._client = client
        self._keys = keys

    async def dead_letters(self, count: int) -> list[DeadDelivery]:
        """The newest ``count`` dead letters, newest first."""
        return await list_dead_deliveries(self._client, self._keys, count)

    async def redeliver(
        self, task_id: str, *, force: bool = False, scan: int = 10_000
    ) -> Redelivery:
        """Send a task's delivery again from its first attempt, with the same webhook-id.

        Looks in the dead letters first (the entry leaves them), then in the webhooks stream
        (newest ``scan`` entries of each). Raises :class:`WebhookNotFoundError` when neither
        holds it, :class:`WebhookBusyError` when the status still says ``pending`` (unless
        ``force``).
        """
        found = await find_delivery(self._client, self._keys, task_id, scan)
        if found is None:
            raise WebhookNotFoundError(f"no webhook delivery found for task {task_id}")
        from_dead = found.dead_entry_id is not None
        # a dead delivery is under way nowhere; a live one may be in a sender's hands right now
        may_be_busy = not from_dead and not force
        if may_be_busy and await delivery_state(self._client, self._keys, task_id) == "pending":
            raise WebhookBusyError(
                f"the webhook of task {task_id} is still being delivered (webhook_state="
                "pending); wait for it, or force a second delivery"
            )
        entry_id = await requeue_delivery(self._client, self._keys, found)
        return Redelivery(entry_id, found.job.delivery_id, from_dead=from_dead)
