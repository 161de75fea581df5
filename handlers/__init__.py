"""Where events meet work: the task worker (and the webhook sender)."""

from handlers.tasks import Worker
from handlers.worker_config import WorkerConfig

__all__ = ["Worker", "WorkerConfig"]
