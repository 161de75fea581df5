"""The body of a webhook delivery (Standard Webhooks' recommended envelope).

``{"type": "task.completed", "timestamp": "<ISO 8601, when the task finished>", "data": ...}``
where ``data`` is the task's terminal outcome (the ``results`` entry) or, in the thin form,
``{"task_id": ...}`` only. Minified JSON; the same bytes on every attempt.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sop_llm.schemas.result import WebhookJob


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def build_body(job: WebhookJob, *, thin: bool, max_bytes: int) -> bytes | None:
    """The whole outcome, or its thin form when ``thin`` or when the whole one is over
    ``max_bytes``; ``None`` when even the thin form is."""
    when = datetime.fromtimestamp(job.created_at / 1000, UTC)
    envelope: dict[str, Any] = {
        "type": job.event,
        "timestamp": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    if not thin:
        data = job.payload.model_dump(mode="json", exclude_none=True)
        full = _json({**envelope, "data": data})
        if len(full) <= max_bytes:
            return full
    small = _json({**envelope, "data": {"task_id": job.task_id}})
    return small if len(small) <= max_bytes else None
