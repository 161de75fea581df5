"""`sop-llm inspect`: one screen on the state of a namespace (or ``--json``).

Partitions (length, lag, pending, oldest pending age), the consumers of every group with the
state of their lease, dead letters, waiting retries, webhooks, and the models (registered at
run time or declared in a worker's file) with the live workers serving each. Reading only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from sop_llm.ops.connect import redis_client_for
from sop_llm.ops.settings import Settings
from sop_llm.ops.sidecar import queue_figures
from sop_llm.schemas.result import DeadLetter
from sop_llm.streams.entries import entries_from_range, text
from sop_llm.streams.keys import WEBHOOK_GROUP, Keys
from sop_llm.streams.models import VERSION_FIELD, worker_models

BUILTIN_MODELS = ("echo",)
_NEWEST_DEAD = 3


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``inspect [--json]``."""
    i = subparsers.add_parser(
        "inspect", help="one-screen summary of queues, consumers, dead letters"
    )
    i.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    i.set_defaults(handler=run)


async def _groups(client: Redis, stream: str) -> list[dict[str, Any]]:
    try:
        return list(await client.xinfo_groups(stream))
    except ResponseError:  # no such key: nothing published yet
        return []


async def consumers(client: Redis, keys: Keys, streams: Sequence[str]) -> list[dict[str, Any]]:
    """Every consumer of every group on ``streams``, summed over the streams (pending) and
    freshest across them (idle), with its lease (``keys.worker(name)``): alive and its TTL."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for stream in streams:
        for group in await _groups(client, stream):
            name = text(group["name"])
            for c in await client.xinfo_consumers(stream, name):
                row = rows.setdefault(
                    (name, text(c["name"])),
                    {"group": name, "consumer": text(c["name"]), "pending": 0, "idle_ms": None},
                )
                row["pending"] += int(c["pending"])
                idle = int(c["idle"])
                row["idle_ms"] = idle if row["idle_ms"] is None else min(row["idle_ms"], idle)
    pipe = client.pipeline(transaction=False)
    for row in rows.values():
        pipe.pttl(keys.worker(row["consumer"]))
    for row, ttl in zip(rows.values(), await pipe.execute(), strict=True):
        # PTTL: -2 no key (lease expired or never taken), -1 a key without expiry
        row["lease_alive"] = int(ttl) != -2
        row["lease_ttl_ms"] = int(ttl) if int(ttl) >= 0 else None
    return sorted(rows.values(), key=lambda r: (r["group"], r["consumer"]))


async def _dead(client: Redis, keys: Keys) -> dict[str, Any]:
    newest = []
    for e in entries_from_range(keys.dead, await client.xrevrange(keys.dead, count=_NEWEST_DEAD)):
        try:
            letter = DeadLetter.model_validate_json(e.data or b"")
        except ValidationError:
            newest.append({"id": e.entry_id, "task_id": None, "reason": "?", "message": ""})
            continue
        newest.append({"id": e.entry_id, "task_id": letter.task_id,
                       "reason": letter.reason.value, "message": letter.message})  # fmt: skip
    return {"length": int(await client.xlen(keys.dead)), "newest": newest}


async def _webhooks(client: Redis, keys: Keys) -> dict[str, Any]:
    group = next((g for g in await _groups(client, keys.webhooks)
                  if text(g["name"]) == WEBHOOK_GROUP), None)  # fmt: skip
    pipe = client.pipeline(transaction=False)
    pipe.xlen(keys.webhooks)
    pipe.zcard(keys.webhooks_delayed)
    pipe.xlen(keys.webhooks_dead)
    length, delayed, dead = await pipe.execute()
    lag = group.get("lag") if group is not None else None
    return {
        "length": int(length),
        "pending": int(group["pending"]) if group is not None else 0,
        "lag": int(lag) if lag is not None else None,
        "delayed": int(delayed),
        "dead": int(dead),
    }


async def collect(client: Redis, keys: Keys, settings: Settings) -> dict[str, Any]:
    """The summary as a JSON-ready dict (what ``--json`` prints)."""
    partitions = await queue_figures(client, keys, settings)
    pipe = client.pipeline(transaction=False)
    pipe.zcard(keys.tasks_delayed)
    pipe.zrange(keys.tasks_delayed, 0, 0, withscores=True)
    pipe.xlen(keys.results)
    pipe.hkeys(keys.models)
    retries, first_due, results_len, model_names = await pipe.execute()
    now = int(time.time() * 1000)
    streams = [row["stream"] for row in partitions]
    registered = {text(n) for n in model_names} - {VERSION_FIELD}
    served: dict[str, list[str]] = {}
    for w in await worker_models(client, keys):  # the file's models and run time's, live
        for model in w.models:
            served.setdefault(model, []).append(w.consumer)
    return {
        "namespace": keys.namespace,
        "at_ms": now,
        "partitions": partitions,
        "consumers": await consumers(client, keys, [*streams, keys.webhooks]),
        "dead": await _dead(client, keys),
        "retries": {
            "waiting": int(retries),
            "next_due_in_ms": max(0, int(first_due[0][1]) - now) if first_due else None,
        },
        "webhooks": await _webhooks(client, keys),
        "results": {"length": int(results_len)},
        "models": sorted(registered | set(served) | set(BUILTIN_MODELS)),
        "served": {m: served[m] for m in sorted(served)},
    }


def age(ms: int | None) -> str:
    """``850ms``, ``12.3s``, ``4m05s``, ``2h03m``, ``3d04h``; ``-`` for none."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms}ms"
    s = ms / 1000
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h < 24 else f"{h // 24}d{h % 24:02d}h"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str) -> list[str]:
    """Aligned columns; ``align`` has one letter per column: ``l`` (text) or ``r`` (numbers)."""
    cells = [list(headers), *([str(v) for v in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return [
        "  ".join(v.ljust(w) if a == "l" else v.rjust(w)
                  for v, w, a in zip(r, widths, align, strict=True)).rstrip()
        for r in cells
    ]  # fmt: skip


def render(report: dict[str, Any]) -> str:
    parts = report["partitions"]
    lines = [f"namespace {report['namespace']}", ""]
    lines += table(
        ["PARTITION", "LENGTH", "LAG", "PENDING", "OLDEST PENDING", "CONSUMERS"],
        [(f"{p['pool']}/{p['partition']}", p["length"], "-" if p["lag"] is None else p["lag"],
          p["pending"], age(p["oldest_pending_age_ms"]), p["consumers"]) for p in parts],
        "lrrrrr",
    )  # fmt: skip
    lines.append("")
    if not report["consumers"]:
        lines.append("(no consumers)")
    else:
        lines += table(
            ["GROUP", "CONSUMER", "PENDING", "IDLE", "LEASE", "TTL"],
            [(c["group"], c["consumer"], c["pending"], age(c["idle_ms"]),
              "alive" if c["lease_alive"] else "expired", age(c["lease_ttl_ms"]))
             for c in report["consumers"]],
            "llrrlr",
        )  # fmt: skip
    dead, retries, hooks = report["dead"], report["retries"], report["webhooks"]
    lines += ["", f"dead letters   {dead['length']}"]
    lines += [f"  {d['id']}  {d['task_id'] or '-'}  {d['reason']}  {d['message'][:80]}"
              for d in dead["newest"]]  # fmt: skip
    lines.append(
        f"retries        {retries['waiting']} waiting"
        + (f", next in {age(retries['next_due_in_ms'])}" if retries["waiting"] else "")
    )
    lines.append(f"webhooks       length {hooks['length']}  pending {hooks['pending']}  "
                 f"delayed {hooks['delayed']}  dead {hooks['dead']}")  # fmt: skip
    lines.append(f"results        length {report['results']['length']}")
    served = report["served"]
    lines.append(
        "models         "
        + ", ".join(
            f"{m} ({len(served[m])} worker{'s' if len(served[m]) != 1 else ''})"
            if m in served
            else f"{m} (no live worker)"
            for m in report["models"]
        )
    )
    return "\n".join(lines)


async def run(settings: Settings, args: argparse.Namespace) -> int:
    keys = Keys(settings.namespace)
    client = redis_client_for(settings)
    try:
        async with asyncio.timeout(30):
            report = await collect(client, keys, settings)
    finally:
        # the client was built on a pool of its own: close that too, or its sockets leak
        await client.aclose(close_connection_pool=True)
    sys.stdout.write((json.dumps(report) if args.json else render(report)) + "\n")
    return 0
