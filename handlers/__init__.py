"""Where events meet work: the task worker (and the webhook sender)."""

from handlers.tasks import Worker, WorkerConfig

__all__ = ["Worker", "WorkerConfig"]
