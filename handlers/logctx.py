"""Per-task logging context, bound through a contextvar and rendered by ops' formatter."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

log_context: ContextVar[dict[str, Any] | None] = ContextVar("sop_log_context", default=None)


def bind(**fields: Any) -> None:
    """Add fields to every log record of the current task (an asyncio task has its own copy)."""
    log_context.set({**(log_context.get() or {}), **fields})
