"""Dead letters: listing, requeueing as new attempts of the same task ids, purging."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ValidationError
from redis.asyncio import Redis

from sop_llm.schemas.result import DeadLetter
from sop_llm.streams.entries import entries_from_range
from sop_llm.streams.keys import Keys
from sop_llm.streams.scripts import REQUEUE_SCRIPT


@dataclass(frozen=True, slots=True)
class DeadEntry:
    entry_id: str
    letter: DeadLetter


@dataclass(frozen=True, slots=True)
class DeadScan:
    entries: list[DeadEntry]
    unreadable: list[str]
    """The ids of dead letters that do not parse (damaged, or written by something else): left
    out of ``entries``, never fatal to the others."""


async def scan_dead(client: Redis, keys: Keys, *, page: int = 500) -> DeadScan:
    """Every task dead letter, oldest first, in pages of ``page``."""
    scan = DeadScan([], [])
    start = "-"
    while True:
        entries = entries_from_range(
            keys.dead, await client.xrange(keys.dead, min=start, max="+", count=page)
        )
        for e in entries:
            try:
                scan.entries.append(
                    DeadEntry(e.entry_id, DeadLetter.model_validate_json(e.data or b""))
                )
            except ValidationError:
                scan.unreadable.append(e.entry_id)
        if len(entries) < page:
            return scan
        start = "(" + entries[-1].entry_id


async def all_dead(client: Redis, keys: Keys, *, page: int = 500) -> list[DeadEntry]:
    """Every readable task dead letter, oldest first (:func:`scan_dead` names the others)."""
    return (await scan_dead(client, keys, page=page)).entries


class NotRequeueable(ValueError):
    """The dead letter holds no usable task event (not UTF-8, no data, not JSON)."""


def _requeue_data(letter: DeadLetter) -> str:
    data = letter.fields.get("data")
    if data is None or data.startswith("base64:"):
        raise NotRequeueable(f"{letter.entry_id}: the entry has no readable data field")
    try:
        body = json.loads(data)
    except ValueError as exc:
        raise NotRequeueable(f"{letter.entry_id}: data is not JSON") from exc
    if not isinstance(body, dict):
        raise NotRequeueable(f"{letter.entry_id}: data is not a JSON object")
    if letter.task_id and body.get("task_id") != letter.task_id:
        # keep the task id the operator knows: a derived id would change with the new entry
        body["task_id"] = letter.task_id
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    return data


async def requeue(client: Redis, keys: Keys, dead: DeadEntry) -> str:
    """Publish the dead task again, as a fresh round of attempts of the same task id, and drop
    the dead letter (atomically). Returns the new entry id. Raises :class:`NotRequeueable`."""
    letter = dead.letter
    if not letter.task_id:
        raise NotRequeueable(f"{dead.entry_id}: no task id")
    keys.parse_tasks_stream(letter.source_stream)  # only back to a task partition of this namespace
    data = _requeue_data(letter)
    reply = await REQUEUE_SCRIPT(
        client,
        [keys.dead, letter.source_stream, keys.task(letter.task_id)],
        [dead.entry_id, data, letter.fields.get("traceparent", ""), letter.task_id],
    )
    return reply.decode() if isinstance(reply, bytes) else str(reply)


async def purge(client: Redis, keys: Keys, entry_ids: list[str]) -> int:
    if not entry_ids:
        return 0
    return int(await client.xdel(keys.dead, *entry_ids))


def matcher(
    *, task_id: str | None = None, reason: str | None = None, model: str | None = None
) -> Callable[[DeadEntry], bool]:
    """A filter over dead letters (all given conditions must hold)."""

    def match(d: DeadEntry) -> bool:
        if task_id is not None and d.letter.task_id != task_id:
            return False
        if reason is not None and d.letter.reason != reason:
            return False
        if model is not None:
            try:
                body = json.loads(d.letter.fields.get("data", ""))
            except ValueError:
                return False
            return isinstance(body, dict) and body.get("model") == model
        return True

    return match
