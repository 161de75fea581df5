"""The task path, in the order a task lives it.

* ``worker``: the worker's loops (intake per pool, reclaiming, lease, cancellations, retries,
  trimming) and its shutdown.
* ``intake``: read what the free slots allow, validate (``prepare``), then start each entry
  on a slot of its model or park it for the next free slot of that model on any worker.
* ``slots``: the one owner of slot state: each model's slots within its pool's cap.
* ``run``: the GPU slot (``gpu``), the start (``begin``), deadline, cancellation and the
  provider call.
* ``finish``: the outcome, the retry policy's decision, and the terminal write.
"""

from sop_llm.handlers.tasks.config import WorkerConfig
from sop_llm.handlers.tasks.worker import Worker

__all__ = ["Worker", "WorkerConfig"]
