"""``sop-llm submit|status|tail|cancel``: one task, or the outcomes as they come."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from sop_llm.ops.connect import redis_client_for
from sop_llm.ops.replay_select import entry_matches
from sop_llm.ops.settings import Settings
from sop_llm.ops.telemetry import tracing
from sop_llm.schemas.result import TaskState
from sop_llm.streams.cancellation import raise_if_cancelled
from sop_llm.streams.control import cancel_task
from sop_llm.streams.entries import entries_from_read
from sop_llm.streams.errors import TRANSIENT_ERRORS
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``submit``, ``status``, ``tail`` and ``cancel``."""
    s = subparsers.add_parser("submit", help="submit a task")
    s.add_argument("--model", default="echo")
    s.add_argument("--prompt", help="prompt text (or give --event)")
    s.add_argument("--event", help="a whole task event as JSON")
    s.add_argument("--priority")
    s.add_argument("--max-tokens", type=int)
    s.add_argument("--temperature", type=float)
    s.add_argument("--idempotency-key")
    s.add_argument("--task-id")
    s.add_argument("--wait", type=float, metavar="SECONDS", help="wait for the result and print it")
    s.set_defaults(handler=_submit)

    st = subparsers.add_parser("status", help="print a task's status record")
    st.add_argument("task_id")
    st.set_defaults(handler=_status)

    t = subparsers.add_parser("tail", help="follow a stream (default: results)")
    t.add_argument(
        "stream", nargs="?", default="results", help="results, dead, webhooks, or a full key"
    )
    t.add_argument(
        "--from", dest="start", default="$", help="entry id to start after ($: new only, 0: all)"
    )
    t.add_argument("--count", type=int, default=0, help="stop after this many entries")
    t.add_argument(
        "--timeout", type=float, default=0, help="stop after this many seconds without entries"
    )
    t.add_argument("--task-id", action="append", help="only this task (repeatable)")
    t.add_argument("--type", help="only entries of this type, e.g. task.failed")
    t.add_argument("--state", choices=[state.value for state in TaskState], help="only this state")
    t.add_argument("--model", help="only tasks of this model")
    t.set_defaults(handler=_tail)

    c = subparsers.add_parser(
        "cancel", help="cancel a task (queued: at once; running: between tokens)"
    )
    c.add_argument("task_id")
    c.set_defaults(handler=_cancel)


@contextlib.asynccontextmanager
async def _producer(settings: Settings) -> AsyncIterator[Producer]:
    # the client comes from ops.connect, so the CLI works with Sentinel and Cluster too
    client = redis_client_for(settings)
    try:
        async with Producer(settings, client=client) as p:
            yield p
    finally:
        await client.aclose()


async def _submit(settings: Settings, args: argparse.Namespace) -> int:
    fields: dict[str, Any] = json.loads(args.event) if args.event else {}
    for name in ("priority", "max_tokens", "temperature", "idempotency_key", "task_id"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if args.prompt is not None:
        fields["prompt"] = args.prompt
    model = fields.pop("model", args.model)
    prompt = fields.pop("prompt", None)
    # the publish span goes where the settings send traces (none by default)
    with tracing(settings):
        return await _submit_traced(settings, args, model, prompt, fields)


async def _submit_traced(
    settings: Settings,
    args: argparse.Namespace,
    model: str,
    prompt: str | None,
    fields: dict[str, Any],
) -> int:
    async with _producer(settings) as p:
        task_id = await p.submit(model, prompt, **fields)
        print(task_id)
        if args.wait:
            watch = asyncio.ensure_future(_watch_holder(p, task_id))
            try:
                result = await p.wait(task_id, timeout=args.wait)
            finally:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
            print(result.model_dump_json(exclude_none=True, indent=2))
    return 0


async def _watch_holder(p: Producer, task_id: str, every_s: float = 2.0) -> None:
    """While ``submit --wait`` waits: say once (on stderr) when the task is running on a worker
    whose lease has lapsed (it died, or lost Redis), so the wait is not a silent time-out."""
    keys, said = p.keys, False
    while not said:
        await asyncio.sleep(every_s)
        with contextlib.suppress(*TRANSIENT_ERRORS):
            record = await p.status(task_id)
            worker = record.worker if record is not None else None
            if record is None or record.state != TaskState.RUNNING or not worker:
                continue
            if not await p.client.exists(keys.worker(worker)):
                print(
                    f"task {task_id} is held by worker {worker}, whose lease has lapsed (it "
                    "died, or cannot reach Redis): a live worker of its pool takes it over "
                    "when it reclaims; see that worker's log for why it stopped",
                    file=sys.stderr,
                    flush=True,
                )
                said = True


async def _status(settings: Settings, args: argparse.Namespace) -> int:
    async with _producer(settings) as p:
        record = await p.status(args.task_id)
    if record is None:
        print(f"no task {args.task_id} (never seen, or expired)", file=sys.stderr)
        return 1
    print(record.model_dump_json(exclude_none=True, indent=2))
    return 0


async def _tail(settings: Settings, args: argparse.Namespace) -> int:
    keys = Keys(settings.namespace)
    named = {"results": keys.results, "dead": keys.dead, "webhooks": keys.webhooks}
    stream = named.get(args.stream, args.stream)
    client = redis_client_for(settings)
    seen, last = 0, args.start
    quiet_since = time.monotonic()
    try:
        while True:
            # short blocking reads, below the client's socket timeout, up to --timeout of quiet
            wait_s = 2.0
            if args.timeout:
                wait_s = min(wait_s, args.timeout - (time.monotonic() - quiet_since))
                if wait_s <= 0:
                    return 0
            reply = await client.xread({stream: last}, count=100, block=max(1, int(wait_s * 1000)))
            raise_if_cancelled()
            if not reply:
                continue
            quiet_since = time.monotonic()
            for entry in entries_from_read(reply):
                last = entry.entry_id
                doc: dict[str, Any] = {"id": last}
                for key, raw in entry.fields.items():
                    value = raw.decode("utf-8", "replace")
                    try:
                        doc[key] = json.loads(value) if key == "data" else value
                    except ValueError:
                        doc[key] = value
                if not entry_matches(doc, args.task_id, args.type, args.state, args.model):
                    continue
                print(json.dumps(doc), flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    return 0
    finally:
        await client.aclose()


async def _cancel(settings: Settings, args: argparse.Namespace) -> int:
    client = redis_client_for(settings)
    try:
        outcome = await cancel_task(
            client, Keys(settings.namespace), args.task_id, status_ttl_s=settings.status_ttl_s
        )
    finally:
        await client.aclose()
    print(f"{args.task_id}: {outcome.value}")
    return 0
