"""The ``sop-llm`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any

from pydantic import ValidationError

from ops import dead_cli, inspect_cli, logs, models_cli, replay, replay_select, webhooks_cli
from ops.app import serve
from ops.connect import redis_client_for
from ops.settings import Settings
from schemas.errors import SopError
from streams.cancellation import raise_if_cancelled
from streams.entries import entries_from_read
from streams.keys import Keys
from streams.producer import Producer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sop-llm", description="LLM inference executor over Redis Streams"
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "up", help="worker + sidecar in one process (embedded Redis when none is configured)"
    )
    sub.add_parser("worker", help="run a worker")
    sub.add_parser("sidecar", help="run the HTTP sidecar")

    s = sub.add_parser("submit", help="submit a task")
    s.add_argument("--model", default="echo")
    s.add_argument("--prompt", help="prompt text (or give --event)")
    s.add_argument("--event", help="a whole task event as JSON")
    s.add_argument("--priority")
    s.add_argument("--max-tokens", type=int)
    s.add_argument("--temperature", type=float)
    s.add_argument("--idempotency-key")
    s.add_argument("--task-id")
    s.add_argument("--wait", type=float, metavar="SECONDS", help="wait for the result and print it")

    st = sub.add_parser("status", help="print a task's status record")
    st.add_argument("task_id")

    t = sub.add_parser("tail", help="follow a stream (default: results)")
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
    replay_select.add_tail_filters(t)
    dead_cli.add_parser(sub)
    webhooks_cli.add_parser(sub)
    models_cli.add_parser(sub)
    replay.add_parser(sub)
    inspect_cli.add_parser(sub)
    return p


@contextlib.asynccontextmanager
async def _producer(settings: Settings) -> AsyncIterator[Producer]:
    # the client comes from ops.connect, so the CLI works with Sentinel and Cluster too
    client = redis_client_for(settings)
    try:
        async with Producer(settings, client=client) as p:
            yield p
    finally:
        await client.aclose()


def _install_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    hits = {"n": 0}

    def on_signal() -> None:
        hits["n"] += 1
        if hits["n"] > 1:
            # a second signal forces the exit: nothing unfinished is acked, so nothing is lost
            os._exit(130)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)


async def _serve(settings: Settings, *, worker: bool, sidecar: bool, embedded: bool) -> int:
    stop = asyncio.Event()
    _install_signals(stop)
    await serve(settings, stop, worker=worker, sidecar=sidecar, allow_embedded=embedded)
    return 0


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
    async with _producer(settings) as p:
        task_id = await p.submit(model, prompt, **fields)
        print(task_id)
        if args.wait:
            result = await p.wait(task_id, timeout=args.wait)
            print(result.model_dump_json(exclude_none=True, indent=2))
    return 0


async def _status(settings: Settings, task_id: str) -> int:
    async with _producer(settings) as p:
        record = await p.status(task_id)
    if record is None:
        print(f"no task {task_id} (never seen, or expired)", file=sys.stderr)
        return 1
    print(record.model_dump_json(exclude_none=True, indent=2))
    return 0


async def _tail(settings: Settings, args: argparse.Namespace) -> int:
    keys = Keys(settings.namespace)
    named = {"results": keys.results, "dead": keys.dead, "webhooks": keys.webhooks}
    stream = named.get(args.stream, args.stream)
    client = redis_client_for(settings)
    seen, last = 0, args.start
    try:
        while True:
            block = int(args.timeout * 1000) if args.timeout else 5000
            reply = await client.xread({stream: last}, count=100, block=block)
            raise_if_cancelled()
            if not reply and args.timeout:
                return 0
            for entry in entries_from_read(reply):
                last = entry.entry_id
                doc: dict[str, Any] = {"id": last}
                for key, raw in entry.fields.items():
                    value = raw.decode("utf-8", "replace")
                    try:
                        doc[key] = json.loads(value) if key == "data" else value
                    except ValueError:
                        doc[key] = value
                if not replay_select.entry_matches(
                    doc, args.task_id, args.type, args.state, args.model
                ):
                    continue
                print(json.dumps(doc), flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    return 0
    finally:
        await client.aclose()


def runner(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop  # optional speed-up
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"sop-llm: invalid settings: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    try:
        match args.command:
            case "up":
                return int(runner(_serve(settings, worker=True, sidecar=True, embedded=True)))
            case "worker":
                return int(runner(_serve(settings, worker=True, sidecar=False, embedded=False)))
            case "sidecar":
                return int(runner(_serve(settings, worker=False, sidecar=True, embedded=False)))
            case "submit":
                return int(runner(_submit(settings, args)))
            case "status":
                return int(runner(_status(settings, args.task_id)))
            case "tail":
                return int(runner(_tail(settings, args)))
            case "cancel":
                return runner(dead_cli.run_cancel(settings, args.task_id))
            case "dead":
                return runner(dead_cli.run_dead(settings, args))
            case "webhooks":
                return runner(webhooks_cli.run_command(settings, args))
            case "models":
                return runner(models_cli.run_command(settings, args))
            case "replay":
                return runner(replay.run(settings, args))
            case "inspect":
                return runner(inspect_cli.run(settings, args))
    except SopError as exc:
        print(f"sop-llm: {exc.code.value}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"sop-llm: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
