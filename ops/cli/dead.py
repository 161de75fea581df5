"""``sop-llm dead list|show|requeue|purge``: the task dead letters."""

from __future__ import annotations

import argparse
import json
import sys

from sop_llm.ops.connect import redis_client_for
from sop_llm.ops.settings import Settings
from sop_llm.streams.dead import DeadEntry, NotRequeueable, matcher, purge, requeue, scan_dead
from sop_llm.streams.keys import Keys


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dead list|show|requeue|purge [entry ids] [--task-id] [--reason] [--model]``."""
    d = subparsers.add_parser("dead", help="dead letters: list, show, requeue, purge")
    d.set_defaults(handler=run_dead)
    dsub = d.add_subparsers(dest="dead_command", required=True)
    for name, text in (
        ("list", "list dead letters (one line each)"),
        ("show", "print dead letters in full"),
        ("requeue", "publish dead tasks again, as new attempts of the same task ids"),
        ("purge", "delete dead letters"),
    ):
        p = dsub.add_parser(name, help=text)
        p.add_argument(
            "entry_ids", nargs="*", help="dead-letter entry ids (default: all that match)"
        )
        p.add_argument("--task-id")
        p.add_argument("--reason", help="error code, e.g. max_attempts")
        p.add_argument("--model")
        if name in ("requeue", "purge"):
            p.add_argument(
                "--all",
                action="store_true",
                help="act on every match (needed without ids or filters)",
            )


def _summary(d: DeadEntry) -> str:
    letter = d.letter
    return (
        f"{d.entry_id}  task={letter.task_id}  reason={letter.reason.value}  "
        f"attempts={letter.attempts}  from={letter.source_stream}  {letter.message}"
    )


async def run_dead(settings: Settings, args: argparse.Namespace) -> int:
    """Run a ``dead`` subcommand; returns the exit status (1: some task not requeued, 2: a
    requeue or purge that names nothing without ``--all``)."""
    keys = Keys(settings.namespace)
    client = redis_client_for(settings)
    try:
        match = matcher(task_id=args.task_id, reason=args.reason, model=args.model)
        scan = await scan_dead(client, keys)
        chosen = [d for d in scan.entries if match(d)]
        # a letter that does not parse matches no filter; named by its id it can be purged
        named = set(args.entry_ids or ())
        unreadable = [i for i in scan.unreadable if i in named]
        if args.entry_ids:
            wanted = set(args.entry_ids)
            chosen = [d for d in chosen if d.entry_id in wanted]
        if scan.unreadable and args.dead_command in ("list", "show"):
            print(
                f"sop-llm: {len(scan.unreadable)} dead letter(s) do not parse and are left out "
                f"(purge them by id): {' '.join(scan.unreadable[:20])}",
                file=sys.stderr,
            )
        filtered = bool(args.entry_ids or args.task_id or args.reason or args.model)
        if args.dead_command in ("requeue", "purge") and not filtered and not args.all:
            print("sop-llm: name entry ids or a filter, or pass --all", file=sys.stderr)
            return 2
        if args.dead_command == "list":
            for d in chosen:
                print(_summary(d))
            print(f"{len(chosen)} dead letter(s)", file=sys.stderr)
        elif args.dead_command == "show":
            for d in chosen:
                print(json.dumps({"id": d.entry_id, **d.letter.model_dump(mode="json")}, indent=2))
        elif args.dead_command == "requeue":
            failed = len(unreadable)
            for entry_id in unreadable:
                print(f"sop-llm: not requeued: {entry_id} does not parse", file=sys.stderr)
            for d in chosen:
                try:
                    new_id = await requeue(client, keys, d)
                    letter = d.letter
                    print(
                        f"{d.entry_id} -> {letter.source_stream} {new_id} (task {letter.task_id})"
                    )
                except (NotRequeueable, ValueError) as exc:
                    failed += 1
                    print(f"sop-llm: not requeued: {exc}", file=sys.stderr)
            return 1 if failed else 0
        else:
            print(
                f"{await purge(client, keys, [d.entry_id for d in chosen] + unreadable)} "
                "dead letter(s) purged"
            )
        return 0
    finally:
        await client.aclose()
