"""Serial latency, task by task: every system's consumer idle at once, tasks taken in turn.

    .venv/bin/python bench/serial_pairs.py --systems sop,loop --tasks 3000 --runs 3

``bench/pipeline.py`` measures serial latency one system after another, interleaved in rounds;
on a shared 2-vCPU VM a round's p50 moves by ±40 µs from one run to the next, more than the
difference between sop-llm and the loop. Here every system's consumer runs at the same time,
each in its own namespace (``bench-<hex>``, deleted afterwards), and the harness publishes one
task to the first system, waits for its result (blocking XREAD on that system's results
stream), then one to the next, and so on: task i of every system sees the same moment of the
machine. Consumers that are not being served are blocked in Redis, doing nothing.

Per run, per system: p10/p50/p90/p99 publish-to-result (client side, ``perf_counter``), and for
each system against the last one given, the median of the per-pair differences and the share
of pairs in which it was faster, and the CPU its consumer process spent per counted task. The
first ``--warmup`` tasks of each system are not counted.

A/B runs of sop-llm itself: ``sop@PATH`` is the worker of another checkout, run from that tree
(``git worktree add /tmp/base HEAD~1``, then ``--systems sop@/tmp/base,sop,loop``). Two copies
of the same tree in one run (A/A) show how far apart identical workers land on this machine.

``--cpu N`` runs a private ``redis-server``, the harness and every consumer on CPU ``N`` only:
each hand-off is then a context switch rather than the wake-up of an idle CPU (which on a VM
costs ten times as much and depends on where the scheduler put each process:
``bench/wakeup.py``). Which runnable process goes first when Redis answers (the harness, or the
consumer handling its own write's reply) is then the scheduler's choice, so a pinned run prices
that order as well as the work on the path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import consumers, sampling, sop_driver
from bench.redisutil import start_private_redis
from streams.keys import Keys


def one_run(url: str, systems: list[str], n: int, warmup: int, log: Path) -> dict[str, Any]:
    r = redis.Redis.from_url(url)
    spaces = {s: Keys(f"bench-{uuid.uuid4().hex[:12]}") for s in systems}
    procs: list[subprocess.Popen[bytes]] = []
    lat: dict[str, list[float]] = {s: [] for s in systems}
    try:
        for s, keys in spaces.items():
            procs.append(consumers.spawn(s, url, keys.namespace, log))
        time.sleep(3.0)  # start-up: every consumer blocked in its read
        for proc, s in zip(procs, systems, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"{s} consumer exited with {proc.returncode}; see {log}")
        last = {s: sop_driver.last_result_id(r, keys) for s, keys in spaces.items()}
        for i in range(warmup + n):
            if i == warmup:
                cpu0 = [sampling.cpu_seconds(proc.pid) for proc in procs]
            for s, keys in spaces.items():
                seconds, last[s], _ = sop_driver.publish_and_wait(
                    r, keys, f"{keys.namespace}.q{i}", last[s]
                )
                if i >= warmup:
                    lat[s].append(seconds * 1e6)
        cpu = {
            s: (sampling.cpu_seconds(proc.pid) - c0) / n * 1e6
            for s, proc, c0 in zip(systems, procs, cpu0, strict=True)
        }
    finally:
        sampling.terminate(*procs)
        for keys in spaces.values():
            sop_driver.cleanup(r, keys)
    out: dict[str, Any] = {}
    ref = systems[-1]
    for s in systems:
        row: dict[str, Any] = {f"p{q}": sampling.pct(lat[s], q) for q in (10, 50, 90, 99)}
        row["cpu_us"] = cpu[s]  # the consumer process's CPU per counted task
        if s != ref:
            diffs = [a - b for a, b in zip(lat[s], lat[ref], strict=True)]
            row["median_diff_us"] = statistics.median(diffs)
            row["faster_share"] = sum(1 for d in diffs if d < 0) / len(diffs)
        out[s] = row
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument(
        "--systems",
        default="sop,loop",
        help=f"from {consumers.SYSTEMS}, or sop@PATH (the worker of the checkout at PATH);"
        " the last is the reference",
    )
    ap.add_argument("--tasks", type=int, default=3000, help="counted tasks per system per run")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write every run here")
    ap.add_argument(
        "--cpu",
        type=int,
        default=-1,
        help="run everything (a private redis-server, this harness, the consumers) on this one"
        " CPU: no hand-off waits for an idle CPU to wake (-1: the shared Redis, no pinning)",
    )
    args = ap.parse_args()
    systems = args.systems.split(",")
    unknown = [s for s in systems if not consumers.known_system(s)]
    if unknown or len(set(systems)) != len(systems):
        ap.error(f"systems must be distinct names from {consumers.SYSTEMS}: {unknown or systems}")
    log = Path(tempfile.gettempdir()) / f"sop-serial-pairs-{uuid.uuid4().hex[:8]}.log"
    with contextlib.ExitStack() as stack:
        url = args.redis_url
        if args.cpu >= 0:
            url = stack.enter_context(pinned_redis(args.cpu))
        runs = measure(args, systems, url, log)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"systems": systems, "runs": runs}, indent=1))
    log.unlink(missing_ok=True)
    return 0


@contextlib.contextmanager
def pinned_redis(cpu: int) -> Iterator[str]:
    """A private redis-server on ``cpu``, and this process (so the consumers it starts) too."""
    with tempfile.TemporaryDirectory(prefix="sop-pairs-") as tmp:
        proc, url = start_private_redis(Path(tmp), cpu)
        try:
            os.sched_setaffinity(0, {cpu})
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def measure(
    args: argparse.Namespace, systems: list[str], url: str, log: Path
) -> list[dict[str, Any]]:
    runs = []
    for k in range(1, args.runs + 1):
        res = one_run(url, systems, args.tasks, args.warmup, log)
        runs.append(res)
        for s, row in res.items():
            rel = ""
            if "median_diff_us" in row:
                rel = (f" | vs {systems[-1]}: median pair diff {row['median_diff_us']:+.0f} µs,"
                       f" faster in {row['faster_share']:.0%} of pairs")  # fmt: skip
            print(f"run {k} {s:12s} p10 {row['p10']:.0f} p50 {row['p50']:.0f} p90 {row['p90']:.0f}"
                  f" p99 {row['p99']:.0f} µs, consumer CPU {row['cpu_us']:.0f} µs/task{rel}",
                  flush=True)  # fmt: skip
    print("\nmedian over runs")
    for s in systems:
        p50 = statistics.median(run[s]["p50"] for run in runs)
        line = f"  {s:12s} p50 {p50:.0f} µs [{min(run[s]['p50'] for run in runs):.0f}-"
        line += f"{max(run[s]['p50'] for run in runs):.0f}]"
        if s != systems[-1]:
            diff = statistics.median(run[s]["median_diff_us"] for run in runs)
            line += f"; median pair diff vs {systems[-1]} {diff:+.0f} µs"
        print(line)
    return runs


if __name__ == "__main__":
    sys.exit(main())
