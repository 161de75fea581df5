"""Where events meet work: the task worker (and the webhook sender)."""

from sop_llm.handlers.tasks import Worker, WorkerConfig

__all__ = ["Worker", "WorkerConfig"]
