"""``sop-llm worker --processes N``: N worker processes on one host, kept running.

One Python process spends about a core on SDK work at a few hundred remote calls a second; more
processes are the way past it. Each child is a plain ``sop-llm worker`` (a consumer of its own in
the group, with its own lease), started with the parent's environment; ``SOP_METRICS_PORT``, when
set, becomes ``port + i`` for child ``i``. A child that exits on its own is started again after a
backoff (1 s doubling to 30 s, reset once it has run for a minute). A stop (SIGTERM, SIGINT) is
passed on to every child, which drains as any worker does; the parent exits once they have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from typing import Final

log = logging.getLogger(__name__)

RESTART_BASE_S: Final = 1.0
RESTART_CAP_S: Final = 30.0
HEALTHY_AFTER_S: Final = 60.0


def child_env(index: int) -> dict[str, str]:
    """The environment of child ``index``: the parent's, with its own metrics port."""
    env = dict(os.environ)
    port = env.get("SOP_METRICS_PORT")
    if port and port.isdigit():
        env["SOP_METRICS_PORT"] = str(int(port) + index)
    return env


async def _keep_running(index: int, stop: asyncio.Event, pids: set[int]) -> int:
    """Run child ``index`` until ``stop``; start it again when it exits on its own."""
    delay = RESTART_BASE_S
    while True:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sop_llm.ops.cli", "worker", env=child_env(index)
        )
        log.info("worker process started", extra={"index": index, "pid": proc.pid})
        pids.add(proc.pid)
        try:
            waiting = asyncio.ensure_future(proc.wait())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if stop.is_set():
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM)
                return await waiting
            code = waiting.result()
        finally:
            pids.discard(proc.pid)
        if time.monotonic() - started >= HEALTHY_AFTER_S:
            delay = RESTART_BASE_S
        log.warning(
            "worker process exited, starting it again",
            extra={"index": index, "pid": proc.pid, "code": code, "in_s": delay},
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
        if stop.is_set():
            return code
        delay = min(delay * 2, RESTART_CAP_S)


async def supervise(processes: int, stop: asyncio.Event, pids: set[int] | None = None) -> int:
    """Run ``processes`` worker processes until ``stop``; 0 when every child ended cleanly.
    ``pids`` is kept to the children alive (a second signal is passed on to them)."""
    alive = pids if pids is not None else set()
    codes = await asyncio.gather(*(_keep_running(i, stop, alive) for i in range(processes)))
    return 0 if all(code == 0 for code in codes) else 1
