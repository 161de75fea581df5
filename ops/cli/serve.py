"""``sop-llm up|worker|sidecar``: run the service until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal

from sop_llm.ops.app import serve
from sop_llm.ops.settings import Settings
from sop_llm.ops.supervise import supervise


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``up``, ``worker`` and ``sidecar``."""
    up = subparsers.add_parser(
        "up", help="worker + sidecar in one process (embedded Redis when none is configured)"
    )
    up.set_defaults(handler=_up)
    w = subparsers.add_parser("worker", help="run a worker")
    w.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="run N worker processes, kept running (past one core's worth of SDK work)",
    )
    w.set_defaults(handler=_worker)
    subparsers.add_parser("sidecar", help="run the HTTP sidecar").set_defaults(handler=_sidecar)


def _install_signals(stop: asyncio.Event, children: set[int] | None = None) -> None:
    loop = asyncio.get_running_loop()
    hits = {"n": 0}

    def on_signal() -> None:
        hits["n"] += 1
        if hits["n"] > 1:
            # a second signal forces the exit: nothing unfinished is acked, so nothing is lost
            for pid in children or ():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)  # their second signal: they exit at once too
            os._exit(130)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)


async def _serve(settings: Settings, *, worker: bool, sidecar: bool, embedded: bool) -> int:
    stop = asyncio.Event()
    _install_signals(stop)
    await serve(settings, stop, worker=worker, sidecar=sidecar, allow_embedded=embedded)
    return 0


async def _up(settings: Settings, args: argparse.Namespace) -> int:
    return await _serve(settings, worker=True, sidecar=True, embedded=True)


async def _worker(settings: Settings, args: argparse.Namespace) -> int:
    if args.processes < 1:
        raise ValueError("--processes: at least 1")
    if args.processes == 1:
        return await _serve(settings, worker=True, sidecar=False, embedded=False)
    stop, children = asyncio.Event(), set[int]()
    _install_signals(stop, children)
    return await supervise(args.processes, stop, children)


async def _sidecar(settings: Settings, args: argparse.Namespace) -> int:
    return await _serve(settings, worker=False, sidecar=True, embedded=False)
