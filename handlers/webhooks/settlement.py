"""What an attempt leaves behind: the policy's decision as the settlement the store writes.

A retry carries the attempts so far on its next entry (so the next sender knows where the
schedule stands); a dead delivery becomes a dead letter with every attempt and the whole job.
"""

from __future__ import annotations

from sop_llm.handlers.webhooks.policy import AttemptResult, Decision
from sop_llm.schemas.result import WebhookJob
from sop_llm.streams.entries import Entry
from sop_llm.streams.webhook_store import (
    AttemptRecord,
    DeadReason,
    Settlement,
    WebhookDeadLetter,
    delivery_fields,
)


def dead_settlement(
    entry: Entry,
    job: WebhookJob | None,
    attempts: list[AttemptRecord],
    reason: DeadReason,
    error: str | None,
    now_ms: int,
) -> Settlement:
    """The settlement of a delivery that ends here: its dead letter and the task's log."""
    last = attempts[-1] if attempts else None
    letter = WebhookDeadLetter(
        reason=reason, delivery_id=job.delivery_id if job else None,
        task_id=job.task_id if job else None, url=job.url if job else None,
        event=job.event if job else None, attempts=attempts, source_stream=entry.stream,
        entry_id=entry.entry_id, job=job, fields=None if job else entry.printable_fields(),
        dead_at=now_ms,
    )  # fmt: skip
    return Settlement(
        outcome="dead", task_id=job.task_id if job else None, attempts=len(attempts),
        last_status=last.status if last else None, last_error=error, dead=letter,
    )  # fmt: skip


def settlement_after(
    entry: Entry,
    job: WebhookJob,
    attempts: list[AttemptRecord],
    result: AttemptResult,
    decision: Decision,
    now_ms: int,
) -> Settlement:
    """The settlement of an attempt (``attempts`` ends with it) under ``decision``."""
    if decision.outcome == "dead":
        assert decision.reason is not None
        return dead_settlement(entry, job, attempts, decision.reason, result.error, now_ms)
    data = (entry.data or b"").decode()
    return Settlement(
        outcome=decision.outcome, task_id=job.task_id, attempts=len(attempts),
        last_status=result.status, last_error=result.error,
        delay_ms=round(decision.delay_s * 1000),
        next_fields=delivery_fields(data, attempts, entry.traceparent),
    )  # fmt: skip


def deferral(entry: Entry, job: WebhookJob, delay_s: float) -> Settlement:
    """Park a fresh delivery for the schedule's first delay, before any attempt."""
    data = (entry.data or b"").decode()
    return Settlement(
        outcome="retry", task_id=job.task_id, attempts=0, delay_ms=round(delay_s * 1000),
        next_fields=delivery_fields(data, [], entry.traceparent),
    )  # fmt: skip
