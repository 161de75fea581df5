"""A guard for reading loops against cancellations lost inside redis-py.

redis-py's asyncio client can swallow the ``CancelledError`` of a blocking read (reproduced with
redis-py 8.1.0 on Python 3.11, about once in 300 cancels of an ``XREAD BLOCK`` on a busy pool;
redis/redis-py#2028 reports the same for ``BRPOPLPUSH``): the read returns as if nothing had
happened and a ``while True`` loop around it reads on forever. The task still counts the request
(``Task.cancelling()``), so a loop that calls :func:`raise_if_cancelled` after each read ends as
it should: with ``CancelledError``, which an enclosing ``asyncio.timeout`` turns into
``TimeoutError`` as usual.
"""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Raise ``CancelledError`` when this task was asked to stop and the request got lost."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
