"""What one task's guarded write costs in Redis, against the loop's unguarded pipeline.

    .venv/bin/python bench/guarded_write.py --tasks 5000 --rounds 3

On a private ``redis-server`` (flushed between variants), one call at a time from one
connection, each call for a new task (the serial case: an instant model, first attempt):

* ``loop``: the pipeline ``bench/baseline_loop.py`` sends per task (``HSET`` state, result and
  finished_at; ``EXPIRE``; ``XADD`` results; ``XACK``), four commands in one write;
* ``begin``: ``BEGIN_MANY`` as the worker sends it (``Outcomes.begin_command``): the checks
  (terminal, duplicate entry, cancel, attempts), the status record in full, the result, the XACK;
* ``begin, loop's record``: the same call, its one-step ``HSET`` cut to the loop's three fields
  (what the rest of the status record costs);
* ``begin, empty body``: the same call, the script only returning its reply (what passing the
  arguments and running a script cost before any command).

No task stream or group exists, so every variant's ``XACK`` finds nothing pending (alike for
all). Each variant that writes must leave one results entry per call, or the run stops.

Per variant: Redis µs per call (``INFO commandstats``: the calls themselves, and the commands
run inside them) and the client's round trip (p50, p10), send to reply. The client and the
server share one CPU (``--cpu``, 0 by default), so the round trip is their work and two context
switches; on different CPUs of a VM it would be mostly the wake-up of an idle vCPU, and which of
the two the scheduler picks changes during a run (``bench/wakeup.py``).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hiredis
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis.asyncio import Redis as AsyncRedis

from bench.peers.common import payload
from bench.redisutil import start_private_redis
from handlers.outcome_writer import OutcomeWriter
from handlers.prepare import generation_request, prepare
from providers.echo import EchoProvider
from schemas.result import TaskState
from streams.entries import Entry
from streams.keys import TASK_GROUP, Keys
from streams.outcome import Finish, Outcomes, Start
from streams.outcome_scripts import BEGIN_MANY

# the one-step HSET of an instant task's first attempt, and the same cut to the loop's fields
_FULL_HSET = """redis.call('HSET', status, 'state', ARGV[f + 6], 'result', ARGV[f + 8],
      'finished_at', ARGV[f + 9], 'task_id', id, 'attempts', attempts, 'model', ARGV[i + 6],
      'stream', source, 'entry_id', e, 'started_at', now, 'worker', worker,
      'reply_to', ARGV[i + 9], 'webhook_url', ARGV[i + 10], 'created_at', cur[6] or ARGV[i + 8])"""
_LOOP_HSET = """redis.call('HSET', status, 'state', ARGV[f + 6], 'result', ARGV[f + 8],
      'finished_at', ARGV[f + 9])"""

Packed = tuple[bytes, int]
"""One call's bytes, and how many replies it gets."""


def begin_calls(keys: Keys, n: int, sha: str) -> list[Packed]:
    """``n`` BEGIN_MANY calls, one new instant task each, built by the worker's own code."""
    outcomes = Outcomes(
        client=AsyncRedis(), keys=keys, worker="bench-worker", status_ttl_s=86_400, max_attempts=3
    )
    writer = OutcomeWriter(outcomes=outcomes, consumer="bench-worker", redis_trouble=())
    echo = EchoProvider()
    stream = keys.tasks("default", "normal")
    out = []
    for i in range(n):
        now = int(time.time() * 1000)
        fields = {"type": b"task.submitted", "data": payload(f"{keys.namespace}.g{i}").encode()}
        entry = Entry(stream=stream, entry_id=f"{now}-{i}", fields=fields)
        p = prepare(entry, keys=keys, max_prompt_bytes=1 << 20, max_metadata_bytes=64 << 10)
        assert p.event is not None, p.error
        gen = echo.answer(generation_request(p.event))
        result = writer.result(
            p, 1, now, TaskState.COMPLETED,
            text=gen.text, finish_reason=gen.finish_reason, usage=gen.usage,
        )  # fmt: skip
        fin = Finish(entry=entry, result=result, reply_to=None, idempotency_key=None, webhook=None)
        start = Start(
            entry=entry, task_id=p.task_id, model=p.model, payload_hash="",
            idempotency_key=None, reply_to=None, webhook_url=None, max_attempts=3, finish=fin,
        )  # fmt: skip
        kk, args = outcomes.begin_command([start], now)
        call: tuple[Any, ...] = ("EVALSHA", sha, len(kk), *kk, *args)
        out.append((hiredis.pack_command(call), 1))
    return out


def loop_calls(keys: Keys, n: int) -> list[Packed]:
    """``n`` pipelines of the loop's four commands (its result JSON: the same size as ours)."""
    stream, results = keys.tasks("default", "normal"), keys.results
    out = []
    for i in range(n):
        task_id = f"{keys.namespace}.g{i}"
        result = payload(task_id)  # ~the size of a result document
        status = keys.task(task_id)
        cmds: list[tuple[Any, ...]] = [
            ("HSET", status, "state", "completed", "result", result, "finished_at", 1),
            ("EXPIRE", status, 86_400),
            ("XADD", results, "*", "type", "task.completed", "data", result),
            ("XACK", stream, TASK_GROUP, f"{i + 1}-0"),
        ]
        out.append((b"".join(hiredis.pack_command(c) for c in cmds), len(cmds)))
    return out


def round_trips(port: int, calls: list[Packed]) -> list[float]:
    """Send each call and wait for its replies before the next: µs per call."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = hiredis.Reader()
    lat = []
    try:
        for data, replies in calls:
            t0 = time.perf_counter()
            sock.sendall(data)
            got = 0
            while got < replies:
                reader.feed(sock.recv(65536))
                while got < replies:
                    reply = reader.gets()
                    if reply is False:
                        break
                    if isinstance(reply, hiredis.ReplyError):
                        raise RuntimeError(f"redis refused a call: {reply}")
                    got += 1
            lat.append((time.perf_counter() - t0) * 1e6)
    finally:
        sock.close()
    return lat


def measure(
    r: redis.Redis,
    port: int,
    source: str | None,
    build: Callable[[str], list[Packed]],
    results: str | None,
) -> dict[str, Any]:
    """Run one variant; ``results``: the stream each call must have added one entry to (a
    script that stopped writing is an error, not a fast variant)."""
    r.flushall()
    sha = r.script_load(source) if source is not None else ""
    calls = build(sha)
    r.config_resetstat()
    lat = round_trips(port, calls)
    stats = r.info("commandstats")
    n = len(calls)
    if results is not None and (written := r.xlen(results)) != n:
        raise SystemExit(f"{n} calls wrote {written} results: the variant does not do its work")
    outer = sum(v["usec"] for k, v in stats.items() if k == "cmdstat_evalsha")
    inner = sum(
        v["usec"]
        for k, v in stats.items()
        if k not in ("cmdstat_evalsha", "cmdstat_config|resetstat", "cmdstat_info")
    )
    total = outer if source is not None else inner
    return {
        "redis_us": total / n,
        "inner_us": inner / n,
        "rtt_p50": statistics.median(lat),
        "rtt_p10": statistics.quantiles(lat, n=10)[0],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--cpu",
        type=int,
        default=0,
        help="run this client and the private redis-server on this one CPU (-1: leave both to"
        " the scheduler, whose placement then decides the round trip; see bench/wakeup.py)",
    )
    args = ap.parse_args()
    keys = Keys("bench-guarded")
    loop_record = BEGIN_MANY.replace(_FULL_HSET, _LOOP_HSET)
    if loop_record == BEGIN_MANY:
        raise SystemExit("BEGIN_MANY's one-step HSET changed: update _FULL_HSET")
    res = keys.results
    variants: dict[str, tuple[str | None, Callable[[str], list[Packed]], str | None]] = {
        "loop": (None, lambda _: loop_calls(keys, args.tasks), res),
        "begin": (BEGIN_MANY, lambda sha: begin_calls(keys, args.tasks, sha), res),
        "begin, loop's record": (loop_record, lambda sha: begin_calls(keys, args.tasks, sha), res),
        "begin, empty body": (
            "return {{'finished', 1}}",
            lambda sha: begin_calls(keys, args.tasks, sha),
            None,
        ),
    }
    seen: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="sop-guarded-") as tmp:
        proc, url = start_private_redis(Path(tmp), args.cpu if args.cpu >= 0 else None)
        if args.cpu >= 0:
            os.sched_setaffinity(0, {args.cpu})
        try:
            r = redis.Redis.from_url(url)
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            for rnd in range(1, args.rounds + 1):
                for name, (source, build, results) in variants.items():
                    out = measure(r, port, source, build, results)
                    seen[name].append(out)
                    print(
                        f"round {rnd} {name:22s} redis {out['redis_us']:5.1f} µs/call "
                        f"(inside: {out['inner_us']:4.1f}), round trip p50 {out['rtt_p50']:5.1f} "
                        f"p10 {out['rtt_p10']:5.1f} µs",
                        flush=True,
                    )
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print("\nmedian over rounds")
    base = statistics.median(o["rtt_p50"] for o in seen["loop"])
    for name, outs in seen.items():
        rtt = statistics.median(o["rtt_p50"] for o in outs)
        red = statistics.median(o["redis_us"] for o in outs)
        print(f"  {name:22s} redis {red:5.1f} µs/call, round trip p50 {rtt:5.1f} µs "
              f"({rtt - base:+.1f} vs loop)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
