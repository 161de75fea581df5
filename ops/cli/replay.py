"""``sop-llm replay``: its arguments, turned into a :class:`~ops.replay.ReplayRequest`."""

from __future__ import annotations

import argparse
import time

from sop_llm.ops.replay import ReplayRequest
from sop_llm.ops.replay import run as run_replay
from sop_llm.ops.replay_select import Filters, parse_time
from sop_llm.ops.settings import Settings
from sop_llm.schemas.result import TaskState


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``replay <stream>`` with its filters and modes (``--sandbox``, ``--run``)."""
    r = subparsers.add_parser(
        "replay", help="select tasks from a stream; re-publish or re-run them"
    )
    r.add_argument("stream", help="results, dead, tasks, a partition name, or a full key")
    r.add_argument("--from-id", help="first entry id (inclusive)")
    r.add_argument("--to-id", help="last entry id (inclusive)")
    r.add_argument("--since", help="ISO time (UTC unless zoned) or relative: 90s, 30m, 2h, 7d")
    r.add_argument("--until", help="ISO time or relative, like --since")
    r.add_argument("--task-id", action="append", default=[], help="only this task (repeatable)")
    r.add_argument("--model-filter", help="only tasks of this model")
    r.add_argument("--state", choices=[s.value for s in TaskState], help="only this state")
    r.add_argument("--limit", type=int, help="at most this many tasks")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--sandbox", metavar="NAMESPACE", help="re-publish into this namespace")
    mode.add_argument("--run", action="store_true", help="re-run in-process and diff the output")
    r.add_argument("--model", help="with --run: use this model instead of the recorded one")
    r.add_argument("--timeout", type=float, default=300.0, help="with --run: seconds per task")
    r.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    r.set_defaults(handler=run)


def request_from_args(args: argparse.Namespace) -> ReplayRequest:
    """The request ``replay`` describes. Raises ``ValueError`` for a bad ``--limit``,
    ``--since`` or ``--until``."""
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1")
    now = int(time.time() * 1000)
    filters = Filters(
        from_id=args.from_id,
        to_id=args.to_id,
        since_ms=parse_time(args.since, now_ms=now) if args.since else None,
        until_ms=parse_time(args.until, now_ms=now) if args.until else None,
        task_ids=frozenset(args.task_id or ()),
        model=args.model_filter,
        state=args.state,
        limit=args.limit,
    )
    return ReplayRequest(
        stream=args.stream, filters=filters, sandbox=args.sandbox, rerun=args.run,
        model=args.model, timeout_s=args.timeout, progress=not args.no_progress,
    )  # fmt: skip


async def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``replay``; the exit status of :func:`ops.replay.run`."""
    return await run_replay(settings, request_from_args(args))
