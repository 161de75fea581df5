"""`sop-llm replay`: select tasks from a stream, then list them, re-publish them into a sandbox
namespace (``--sandbox``), or re-run them in-process and diff the output (``--run``).

A sandbox copy gets a fresh task id, ``metadata.replay_of`` / ``metadata.replay_namespace``
naming the original, and no ``webhook_url``, ``idempotency_key`` or absolute ``deadline``: its
outcome lands only in the sandbox's streams and never reaches a production receiver.
``--run`` writes nothing to Redis. The command's arguments become a :class:`ReplayRequest` in
``ops/cli/replay.py``.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from pydantic import ValidationError
from redis.asyncio import Redis

from sop_llm.ops.app import model_registry
from sop_llm.ops.connect import redis_client_for
from sop_llm.ops.replay_select import Candidate, Filters, select, source_streams
from sop_llm.ops.settings import Settings
from sop_llm.providers.base import Generation, GenerationRequest
from sop_llm.providers.registry import ModelRegistry
from sop_llm.schemas.errors import SopError
from sop_llm.schemas.result import TaskResult
from sop_llm.schemas.task import (
    CTX_MAX_METADATA_BYTES,
    CTX_MAX_PROMPT_BYTES,
    TaskEvent,
    describe_validation_error,
)
from sop_llm.schemas.wire import FIELD_DATA, FIELD_TYPE, EventType
from sop_llm.streams.keys import Keys

# fields a sandbox copy must not carry: callbacks to production receivers, a key shared with
# the original, an absolute deadline that has most likely passed
_DROPPED = ("webhook_url", "idempotency_key", "deadline")


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """What to replay and how: the entries of ``stream`` (``results``, ``dead``, ``tasks``, a
    partition name or a full key) that pass ``filters``; listed when no mode is given,
    re-published into the ``sandbox`` namespace, or re-run in-process (``rerun``) with ``model``
    instead of the recorded one when given, ``timeout_s`` per task."""

    stream: str
    filters: Filters
    sandbox: str | None = None
    rerun: bool = False
    model: str | None = None
    timeout_s: float = 300.0
    progress: bool = True
    """A progress bar on stderr (only where stderr is a terminal)."""


class Progress:
    """A one-line progress bar on ``out`` (stderr), drawn only when ``enabled``."""

    def __init__(self, total: int, *, out: TextIO, enabled: bool, width: int = 30) -> None:
        self.total, self.done, self._out, self._width = total, 0, out, width
        self.enabled = enabled and total > 1

    def draw(self) -> None:
        if self.enabled:
            filled = self._width * self.done // max(1, self.total)
            bar = "#" * filled + "." * (self._width - filled)
            self._out.write(f"\r[{bar}] {self.done}/{self.total}")
            self._out.flush()

    def clear(self) -> None:
        if self.enabled:
            self._out.write("\r" + " " * (self._width + 24) + "\r")

    def advance(self) -> None:
        self.done += 1
        self.draw()

    def finish(self) -> None:
        if self.enabled:
            self.clear()
            self._out.flush()


def sandbox_data(c: Candidate, *, new_id: str, namespace: str) -> str:
    """The sandbox copy's ``data``: the original event with a fresh id, linked to the original,
    without the fields in ``_DROPPED``."""
    assert c.event is not None
    body = {name: value for name, value in c.event.items() if name not in _DROPPED}
    meta = body.get("metadata")
    body["metadata"] = {
        **(meta if isinstance(meta, dict) else {}),
        "replay_of": c.task_id,
        "replay_namespace": namespace,
    }
    body["task_id"] = new_id
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def _out(line: str, progress: Progress | None = None) -> None:
    if progress is not None:
        progress.clear()
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    if progress is not None:
        progress.draw()


def _warn(line: str, progress: Progress | None = None) -> None:
    if progress is not None:
        progress.clear()
    sys.stderr.write(f"sop-llm: {line}\n")
    if progress is not None:
        progress.draw()


async def _to_sandbox(
    client: Redis, chosen: Sequence[Candidate], prod: Keys, sandbox: Keys, progress: Progress
) -> int:
    failed = 0
    for c in chosen:
        try:
            if c.problem is not None or c.event is None or c.origin_stream is None:
                raise ValueError(c.problem or "no original event")
            pool, partition = prod.parse_tasks_stream(c.origin_stream)
        except ValueError as exc:
            failed += 1
            _warn(f"{c.task_id}: not replayed: {exc}", progress)
        else:
            new_id = f"replay-{uuid.uuid4().hex}"
            data = sandbox_data(c, new_id=new_id, namespace=prod.namespace)
            async with asyncio.timeout(15):
                await client.xadd(
                    sandbox.tasks(pool, partition),
                    {FIELD_TYPE: EventType.TASK_SUBMITTED.value, FIELD_DATA: data},
                )
            _out(f"{c.task_id} -> {new_id}", progress)
        progress.advance()
    return failed


def _usage_line(
    label: str, usage: tuple[int | None, int | None] | None, run_ms: int | None, what: str
) -> str:
    # an unknown count (the backend reported none) reads "?"
    i, o = ("?" if n is None else n for n in usage) if usage else ("", "")
    tokens = f"tokens in {i} / out {o}" if usage else "tokens -"
    ms = f"run {run_ms} ms" if run_ms is not None else "run -"
    return f"{label:<9} {what}  {tokens}  {ms}"


def _recorded_line(result: TaskResult | None) -> str:
    if result is None:
        return "recorded: (no recorded outcome: status record expired or task unfinished)"
    what = result.state.value
    if result.error is not None:
        what += f" ({result.error.code.value}: {result.error.message})"
    elif result.finish_reason:
        what += f" ({result.finish_reason})"
    usage = (result.usage.input_tokens, result.usage.output_tokens) if result.usage else None
    return _usage_line("recorded:", usage, result.run_ms, what)


async def _generate(
    registry: ModelRegistry, event: TaskEvent, model: str, timeout_s: float
) -> tuple[Generation, int]:
    binding = registry.resolve(model)
    request = GenerationRequest(
        model=model, prompt=event.prompt, messages=event.messages,
        temperature=event.temperature, top_p=event.top_p, max_tokens=event.max_tokens,
        stop=tuple(event.stop or ()), seed=event.seed, response_format=event.response_format,
    )  # fmt: skip
    started = time.monotonic()
    with binding.in_use():
        async with asyncio.timeout(timeout_s):
            generation = await binding.provider.generate(request)
    return generation, int((time.monotonic() - started) * 1000)


async def _rerun_one(
    registry: ModelRegistry, c: Candidate, context: dict[str, int], request: ReplayRequest
) -> tuple[bool, list[str]]:
    """Run one task again; ``(ran, lines to print)``."""
    lines = [f"=== {c.task_id}  ({c.stream} {c.entry_id})", _recorded_line(c.recorded)]
    if c.problem is not None or c.event is None:
        return False, [*lines, f"replay:   not run: {c.problem or 'no original event'}"]
    try:
        event = TaskEvent.model_validate(c.event, context=context)
        model = request.model or event.model
        gen, run_ms = await _generate(registry, event, model, request.timeout_s)
    except ValidationError as exc:
        return False, [
            *lines,
            f"replay:   not run: invalid event: {describe_validation_error(exc)}",
        ]
    except TimeoutError:
        return False, [*lines, f"replay:   not run: timed out after {request.timeout_s} s"]
    except SopError as exc:  # model_not_found, and every provider error
        return False, [*lines, f"replay:   failed ({exc.code.value}: {exc})"]
    usage = (gen.usage.input_tokens, gen.usage.output_tokens)
    lines.append(
        _usage_line("replay:", usage, run_ms, f"completed ({gen.finish_reason}) with {model}")
    )
    old = (c.recorded.text or "") if c.recorded else ""
    diff = difflib.unified_diff(old.splitlines(), gen.text.splitlines(), "recorded", "replay",
                                lineterm="")  # fmt: skip
    return True, [*lines, *(list(diff) or ["(output identical)"])]


async def _rerun(
    settings: Settings, request: ReplayRequest, chosen: Sequence[Candidate], progress: Progress
) -> int:
    context = {CTX_MAX_PROMPT_BYTES: settings.max_prompt_bytes,
               CTX_MAX_METADATA_BYTES: settings.max_metadata_bytes}  # fmt: skip
    failed = 0
    client = redis_client_for(settings)
    try:
        async with model_registry(settings, client) as (registry, _, _):
            for c in chosen:
                ran, lines = await _rerun_one(registry, c, context, request)
                failed += not ran
                _out("\n".join(lines), progress)
                progress.advance()
    finally:
        await client.aclose()
    return failed


def _listing(c: Candidate) -> str:
    note = f"  ! {c.problem}" if c.problem else ""
    return (f"{c.entry_id}  {c.task_id}  model={c.model or '-'}  state={c.state or '-'}"
            f"{note}")  # fmt: skip


async def run(settings: Settings, request: ReplayRequest) -> int:
    """Select, then list (no mode), re-publish (``sandbox``) or re-run (``rerun``).
    Returns 0, 1 when some task could not be replayed, 2 for bad arguments."""
    prod = Keys(settings.namespace)
    if request.sandbox is not None and request.sandbox == settings.namespace:
        _warn(f"--sandbox must differ from the production namespace {settings.namespace!r}")
        return 2
    sandbox = Keys(request.sandbox) if request.sandbox is not None else None  # raises if bad
    if request.model and not request.rerun:
        _warn("--model needs --run (to filter by model, use --model-filter)")
        return 2
    pools = tuple(dict.fromkeys((*settings.pools, settings.pool)))
    source, streams = source_streams(request.stream, prod, pools=pools,
                                     partitions=settings.partitions)  # fmt: skip
    failed = 0
    client = redis_client_for(settings)
    try:
        # no overall deadline: a long stream takes long to scan; each call has the client's
        chosen = await select(client, prod, source, streams, request.filters)
        progress = Progress(len(chosen), out=sys.stderr, enabled=request.progress
                            and sys.stderr.isatty())  # fmt: skip
        if sandbox is not None and chosen:
            failed = await _to_sandbox(client, chosen, prod, sandbox, progress)
    finally:
        # the client was built on a pool of its own: close that too, or its sockets leak
        await client.aclose(close_connection_pool=True)
    if not chosen:
        _warn("nothing selected")
        return 0
    if request.rerun:  # with no Redis client left open: a re-run writes nothing
        failed = await _rerun(settings, request, chosen, progress)
    elif sandbox is None:
        for c in chosen:
            _out(_listing(c))
    progress.finish()
    done = "listed" if sandbox is None and not request.rerun else "replayed"
    _warn(f"{len(chosen) - failed} of {len(chosen)} task(s) {done}")
    return 1 if failed else 0
