"""The ``sop-llm`` command line: one module per command group.

Each group module has ``register(subparsers)``, which adds its commands and gives each a
``handler``: a coroutine function ``(settings, args)`` that returns the exit status.
:func:`main` parses the arguments, builds the :class:`~ops.settings.Settings`, configures
logging and runs the chosen handler on a fresh event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import io
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from pydantic import ValidationError

from sop_llm.ops import logs
from sop_llm.ops.cli import dead, inspect, models, replay, serve, tasks, webhooks
from sop_llm.ops.settings import Settings
from sop_llm.schemas.errors import SopError

__all__ = ["build_parser", "main", "runner"]

# in the order `sop-llm --help` lists the commands
_GROUPS = (serve, tasks, dead, webhooks, models, replay, inspect)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``sop-llm`` parser: every group's commands under one ``command``."""
    parser = argparse.ArgumentParser(
        prog="sop-llm", description="LLM inference executor over Redis Streams"
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for group in _GROUPS:
        group.register(subparsers)
    return parser


def _loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    try:
        import uvloop  # optional speed-up
    except ImportError:
        return asyncio.run
    return uvloop.run


def runner(coro: Coroutine[Any, Any, int]) -> int:
    """Run ``coro`` on a fresh event loop (uvloop's when installed) and return its result.

    The loop is chosen first and runs outside the ``except ImportError`` of that choice, so an
    error the command raises carries no "No module named 'uvloop'" context."""
    run = _loop_runner()
    return run(coro)


def _enable_faulthandler() -> None:
    """Dump the stacks on a fatal signal to stderr (the process's own, when ``sys.stderr`` was
    replaced by something without a file descriptor, as under a test's capture)."""
    for stream in (sys.stderr, sys.__stderr__):
        if stream is None:
            continue
        try:
            faulthandler.enable(file=stream)
            return
        except (AttributeError, ValueError, io.UnsupportedOperation):
            continue


def main(argv: Sequence[str] | None = None) -> int:
    """The ``sop-llm`` entry point; returns the exit status: 0 done, 1 a task error or a
    command that found nothing, 2 bad arguments or settings, 130 interrupted."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"sop-llm: invalid settings: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    # a crash in native code (llama.cpp, a SIGILL from a CPU-specific build, a SIGSEGV) leaves
    # the Python stacks on stderr instead of a process gone without a line
    _enable_faulthandler()
    try:
        return runner(args.handler(settings, args))
    except SopError as exc:
        print(f"sop-llm: {exc.code.value}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"sop-llm: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
