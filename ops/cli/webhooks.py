"""``sop-llm webhooks redeliver|dead``: look at dead deliveries and send one again."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sop_llm.handlers.webhooks import WebhookAdmin, WebhookBusyError, WebhookNotFoundError
from sop_llm.ops.connect import redis_client_for
from sop_llm.ops.settings import Settings
from sop_llm.streams.keys import Keys


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``webhooks redeliver <task_id> [--force]`` and ``webhooks dead [--count N] [--full]``."""
    w = subparsers.add_parser("webhooks", help="look at and retry webhook deliveries")
    w.set_defaults(handler=run_command)
    sub = w.add_subparsers(dest="webhooks_command", required=True)
    r = sub.add_parser("redeliver", help="send a task's webhook again (same webhook-id)")
    r.add_argument("task_id")
    r.add_argument("--force", action="store_true", help="even while a delivery is under way")
    d = sub.add_parser("dead", help="list dead webhook deliveries, newest first (JSON lines)")
    d.add_argument("--count", type=int, default=20, help="how many (default 20)")
    d.add_argument("--full", action="store_true", help="include the whole delivery job")


def _out(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")


async def run_command(settings: Settings, args: argparse.Namespace) -> int:
    """Run a ``webhooks`` subcommand; returns the exit status (1: nothing to redeliver)."""
    client = redis_client_for(settings)
    admin = WebhookAdmin(client=client, keys=Keys(settings.namespace))
    try:
        if args.webhooks_command == "redeliver":
            try:
                done = await admin.redeliver(args.task_id, force=args.force)
            except (WebhookNotFoundError, WebhookBusyError) as exc:
                sys.stderr.write(f"sop-llm: {exc}\n")
                return 1
            _out({"task_id": args.task_id, "delivery_id": done.delivery_id,
                  "entry_id": done.entry_id, "from_dead": done.from_dead})  # fmt: skip
            return 0
        if args.webhooks_command == "dead":
            hide = None if args.full else {"job", "fields"}
            for entry in await admin.dead_letters(max(1, args.count)):
                if entry.letter is None:
                    _out({"id": entry.entry_id, "raw": entry.raw})
                else:
                    doc = entry.letter.model_dump(mode="json", exclude_none=True, exclude=hide)
                    _out({"id": entry.entry_id, **doc})
            return 0
        sys.stderr.write(f"sop-llm: unknown webhooks command {args.webhooks_command!r}\n")
        return 2
    finally:
        await client.aclose()
