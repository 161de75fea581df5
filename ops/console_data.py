"""What the console and the HTTP API read: one Redis picture per view, as JSON-ready dicts.

* :func:`overview`: ``sop-llm inspect``'s summary (:func:`ops.cli.inspect.collect`), plus each
  partition's ``entries_added`` (rates are the change of it between two reads) and the age of
  its oldest entry not delivered yet, and the live workers from their leases (pools, models,
  store version, lease time left, entries held);
* :func:`inflight`: the entries delivered and not finished, each with its task's state;
* :func:`recent_results`: the newest outcomes of the results stream, filtered;
* :func:`dead_letters`: the task dead letters, filtered (an entry that does not parse is
  counted, never fatal);
* :func:`task_history`: what a task's status record leaves out: earlier attempts' errors and
  its dead letters, task and webhook.

Every function reads only, and raises what redis-py raises (the sidecar answers 503).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from pydantic import TypeAdapter, ValidationError
from redis.asyncio import Redis

from sop_llm.ops.settings import Settings
from sop_llm.schemas.result import DeadLetter, ErrorInfo, TaskResult
from sop_llm.streams import keys as k
from sop_llm.streams.dead import DeadEntry, matcher
from sop_llm.streams.entries import Entry, entries_from_range, text
from sop_llm.streams.keys import PARKED_CONSUMER, TASK_GROUP, Keys
from sop_llm.streams.models import worker_models
from sop_llm.streams.webhook_dead import list_dead_deliveries

_Json = dict[str, Any]
SCAN_LIMIT: Final = 5000
"""The most entries of a stream one request reads back to find its matches."""
_PAGE: Final = 500
_ERRORS: Final = TypeAdapter(list[ErrorInfo])


async def overview(client: Redis, keys: Keys, settings: Settings) -> _Json:
    """The ``GET /v1/overview`` body (its schema: ``ops/openapi/console_schemas.py``)."""
    # imported here: ops.cli.inspect imports ops.sidecar, which serves this module's answers
    from sop_llm.ops.cli.inspect import collect

    report = await collect(client, keys, settings)
    pipe = client.pipeline(transaction=False)
    for row in report["partitions"]:
        pipe.xinfo_stream(row["stream"])
        # the oldest entry not delivered yet: the first after the group's last delivered one
        after = row.get("last_delivered_id")
        pipe.xrange(row["stream"], f"({after}" if after else "-", "+", count=1)
    replies = await pipe.execute(raise_on_error=False)
    now = report["at_ms"]
    for i, row in enumerate(report["partitions"]):
        info, first = replies[2 * i], replies[2 * i + 1]
        # a stream not created yet has had nothing added
        row["entries_added"] = 0 if isinstance(info, Exception) else int(info["entries-added"])
        waiting = None
        if not isinstance(first, Exception) and first:
            waiting = max(0, now - int(text(first[0][0]).split("-")[0]))
        row["oldest_waiting_age_ms"] = waiting
    held: dict[str, int] = {}
    for c in report["consumers"]:
        if c["group"] == TASK_GROUP:
            held[c["consumer"]] = held.get(c["consumer"], 0) + c["pending"]
    live = await worker_models(client, keys)
    pipe = client.pipeline(transaction=False)
    for w in live:
        pipe.pttl(keys.worker(w.consumer))
    ttls = await pipe.execute()
    report["workers"] = [
        {
            "consumer": w.consumer,
            "pools": list(w.pools),
            "models": list(w.models),
            "version": w.version,
            "lease_ttl_ms": int(ttl) if int(ttl) >= 0 else None,
            "held": held.get(w.consumer, 0),
        }
        for w, ttl in zip(live, ttls, strict=True)
        if w.pools  # a webhook sender's lease names no pool: it is listed among consumers
    ]
    report["parked"] = held.get(PARKED_CONSUMER, 0)
    return report


@dataclass(frozen=True, slots=True)
class _Held:
    stream: str
    pool: str
    partition: str
    entry_id: str
    consumer: str
    idle_ms: int
    deliveries: int


async def inflight(client: Redis, keys: Keys, settings: Settings, *, limit: int) -> _Json:
    """The ``GET /v1/inflight`` body: up to ``limit`` entries per partition that the task
    group delivered and did not finish (running, or parked waiting for their model), oldest
    first, each with its task's id, state and model."""
    parts = [(pool, part) for part in settings.partitions for pool in settings.pools]
    pipe = client.pipeline(transaction=False)
    for pool, part in parts:
        pipe.xpending_range(keys.tasks(pool, part), TASK_GROUP, "-", "+", limit)
    held: list[_Held] = []
    truncated = False
    for (pool, part), rows in zip(parts, await pipe.execute(raise_on_error=False), strict=True):
        if isinstance(rows, Exception):
            continue  # no stream or no group yet: nothing is held
        truncated = truncated or len(rows) >= limit
        stream = keys.tasks(pool, part)
        held += [
            _Held(stream, pool, part, text(r["message_id"]), text(r["consumer"]),
                  int(r["time_since_delivered"]), int(r["times_delivered"]))
            for r in rows
        ]  # fmt: skip
    held.sort(key=lambda h: tuple(int(part) for part in h.entry_id.split("-")))  # oldest first
    pipe = client.pipeline(transaction=False)
    for h in held:
        pipe.xrange(h.stream, h.entry_id, h.entry_id)
    ids = []
    for h, reply in zip(held, await pipe.execute(), strict=True):
        found = entries_from_range(h.stream, reply)
        hint = found[0].task_id_hint() if found else None
        ids.append(hint or keys.derived_task_id(h.pool, h.partition, h.entry_id))
    fields = [k.F_STATE, k.F_MODEL, k.F_STARTED_AT, k.F_ATTEMPTS]
    pipe = client.pipeline(transaction=False)
    for task_id in ids:
        pipe.hmget(keys.task(task_id), fields)
    tasks = []
    for h, task_id, raw in zip(held, ids, await pipe.execute(), strict=True):
        state, model, started, attempts = (None if v is None else text(v) for v in raw)
        tasks.append(
            {
                "task_id": task_id, "state": state, "model": model,
                "started_at": int(started) if started else None,
                "attempts": int(attempts) if attempts else 0,
                "pool": h.pool, "partition": h.partition, "entry_id": h.entry_id,
                "consumer": h.consumer, "parked": h.consumer == PARKED_CONSUMER,
                "idle_ms": h.idle_ms, "deliveries": h.deliveries,
            }
        )  # fmt: skip
    return {"tasks": tasks, "truncated": truncated}


async def _newest(client: Redis, stream: str, scan: int | None) -> list[Entry]:
    """Up to ``scan`` entries of ``stream`` (``None``: all), newest first, read in pages."""
    out: list[Entry] = []
    top = "+"
    while scan is None or len(out) < scan:
        page_size = _PAGE if scan is None else min(_PAGE, scan - len(out))
        page = entries_from_range(stream, await client.xrevrange(stream, top, "-", count=page_size))
        if not page:
            break
        out += page
        top = "(" + page[-1].entry_id
    return out


async def recent_results(
    client: Redis,
    keys: Keys,
    *,
    count: int,
    state: str | None = None,
    model: str | None = None,
    task_id: str | None = None,
) -> _Json:
    """The ``GET /v1/results`` body: the newest ``count`` outcomes that pass the filters,
    newest first, found among the newest :data:`SCAN_LIMIT` entries."""
    found: list[_Json] = []
    scanned = 0
    top = "+"
    while len(found) < count and scanned < SCAN_LIMIT:
        page = entries_from_range(
            keys.results, await client.xrevrange(keys.results, top, "-", count=_PAGE)
        )
        if not page:
            break
        scanned += len(page)
        top = "(" + page[-1].entry_id
        for entry in page:
            try:
                result = TaskResult.model_validate_json(entry.data or b"")
            except ValidationError:
                continue  # not an outcome this version of sop-llm wrote
            if (
                (state is None or result.state == state)
                and (model is None or result.model == model)
                and (task_id is None or result.task_id == task_id)
            ):
                found.append({"id": entry.entry_id, **result.model_dump(mode="json")})
                if len(found) == count:
                    break
    return {"results": found, "length": int(await client.xlen(keys.results))}


def dead_row(d: DeadEntry) -> _Json:
    """One dead letter as the API lists it (the raw entry's fields are left out)."""
    letter = d.letter
    try:
        body = json.loads(letter.fields.get("data", ""))
    except ValueError:
        body = None
    return {
        "id": d.entry_id,
        "task_id": letter.task_id,
        "reason": letter.reason.value,
        "message": letter.message,
        "attempts": letter.attempts,
        "source_stream": letter.source_stream,
        "model": body.get("model") if isinstance(body, dict) else None,
        "errors": [e.model_dump(mode="json") for e in letter.errors],
        "dead_at": letter.dead_at,
    }


async def read_dead(
    client: Redis, keys: Keys, *, scan: int | None = SCAN_LIMIT
) -> tuple[list[DeadEntry], int]:
    """The newest ``scan`` task dead letters (``None``: all), oldest first, and how many did not
    parse (an entry that does not parse is counted, never fatal)."""
    letters, unreadable = [], 0
    for entry in reversed(await _newest(client, keys.dead, scan)):
        try:
            letters.append(
                DeadEntry(entry.entry_id, DeadLetter.model_validate_json(entry.data or b""))
            )
        except ValidationError:
            unreadable += 1
    return letters, unreadable


async def dead_letters(
    client: Redis,
    keys: Keys,
    *,
    count: int,
    task_id: str | None = None,
    reason: str | None = None,
    model: str | None = None,
) -> _Json:
    """The ``GET /v1/dead`` body: the newest ``count`` dead letters that pass the filters,
    newest first."""
    letters, unreadable = await read_dead(client, keys)
    match = matcher(task_id=task_id, reason=reason, model=model)
    chosen = [d for d in reversed(letters) if match(d)][:count]
    return {
        "length": int(await client.xlen(keys.dead)),
        "unreadable": unreadable,
        "letters": [dead_row(d) for d in chosen],
    }


async def webhook_dead_letters(client: Redis, keys: Keys, *, count: int) -> _Json:
    """The ``GET /v1/webhooks/dead`` body: the newest ``count`` dead deliveries."""
    rows = []
    for d in await list_dead_deliveries(client, keys, count):
        letter = d.letter
        if letter is None:
            rows.append({"id": d.entry_id, "readable": False})
            continue
        last = letter.attempts[-1] if letter.attempts else None
        rows.append(
            {
                "id": d.entry_id, "readable": True, "task_id": letter.task_id,
                "delivery_id": letter.delivery_id, "url": letter.url,
                "reason": str(letter.reason), "attempts": len(letter.attempts),
                "last_attempt": last.model_dump(mode="json") if last is not None else None,
                "dead_at": letter.dead_at,
            }
        )  # fmt: skip
    return {"length": int(await client.xlen(keys.webhooks_dead)), "letters": rows}


async def task_history(client: Redis, keys: Keys, task_id: str) -> _Json:
    """The ``GET /v1/tasks/{task_id}/history`` body (the task is known to exist)."""
    raw = await client.hget(keys.task(task_id), k.F_ERRORS)
    try:
        errors = [e.model_dump(mode="json") for e in _ERRORS.validate_json(raw or b"[]")]
    except ValidationError:
        errors = []  # an unreadable list tells nothing
    letters, _ = await read_dead(client, keys)
    hooks = await webhook_dead_letters(client, keys, count=SCAN_LIMIT)
    return {
        "errors": errors,
        "dead_letters": [dead_row(d) for d in letters if d.letter.task_id == task_id],
        "webhook_dead_letters": [row for row in hooks["letters"] if row.get("task_id") == task_id],
    }
