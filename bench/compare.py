"""sop-llm against the tools users would pick instead: throughput and latency of a no-op task.

    bench/.venv-peers/bin/python bench/compare.py --tasks 20000 --rounds 3

Runs under the peers' venv (``bench/.venv-peers``: faststream, arq, taskiq(-redis), celery,
matplotlib; their redis-py pins differ from the project's); sop-llm and the hand-written loop run
from the project venv (``.venv/bin/python -m sop_llm.ops.cli worker``,
``bench/baseline_loop.py``). Every
consumer is its own process, on a private ``redis-server`` started for the run (no
persistence); the server is flushed between runs, and nothing else is touched.

Systems, interleaved in rounds (sop, sop-256, sop-2, loop, faststream, arq, taskiq, celery, sop,
...):
``sop`` (one ``ops.cli worker``, defaults, every guarantee on), ``sop-256`` (the same with 256
slots, so it reads batches of up to 128 like the loop's 256), ``sop-2`` (two default workers),
``loop`` (bench/baseline_loop.py), and one module per peer under ``bench/peers/``. Every system
gets the same ~530-byte JSON task, parses it, builds the echo result JSON and stores a status
record and the result (see each module's docstring for how and with what settings).

Per system per round:

1. **throughput**: ``--tasks`` tasks are published with the system's own client before its
   consumer starts; then the consumer is spawned and its results are counted every 5 ms (XLEN of
   its results stream, or EXISTS over its result keys in task order) until all are there.
   ``tasks/s`` is the steady rate from the first poll that saw a result to the last (start-up is
   left out); the rate from spawn is kept beside it. Consumer CPU (``/proc``), Redis CPU and the
   server's ``INFO commandstats`` delta (commands per task) are sampled around it.
2. **serial latency**: consumer idle, keyspace notifications on (only for this phase): publish
   one task with the system's client, wait for the keyspace event of the write that completes it
   (its result key, or the XADD to its results stream), repeat; p50/p99 from just before the
   publish call (``perf_counter``).

The load average is recorded before every run. Plots go to docs/img/benchmarks-*.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.compare_report import markdown, plot, ratios, summarise, versions  # noqa: E402
from bench.compare_systems import PROJECT_PY, SYSTEMS, DoneCounter, System, make_system  # noqa: E402
from bench.redisutil import start_private_redis  # noqa: E402
from bench.sampling import commandstats, pct, redis_cpu, terminate, tree_cpu  # noqa: E402

POLL_S = 0.005

# --------------------------------------------------------------------------------------------
# measurements


def throughput(
    r: redis.Redis, url: str, system: System, n: int, log: Path
) -> tuple[list[subprocess.Popen[bytes]], dict[str, Any]]:
    tag = uuid.uuid4().hex[:6]
    task_ids = [f"{system.id_prefix}{tag}.{i}" for i in range(n)]
    system.prepare(r)
    t0 = time.perf_counter()

    async def publish() -> None:
        async with system.publisher(url) as pub:
            await pub.publish(task_ids)

    asyncio.run(publish())
    publish_s = time.perf_counter() - t0
    stats0, rcpu0 = commandstats(r), redis_cpu(r)
    counter = DoneCounter(r, system, task_ids)
    t_spawn = time.perf_counter()
    procs = system.spawn(url, log)
    first: dict[str, float] = {}
    deadline = time.monotonic() + 600
    while True:
        have = counter.count()
        now = time.perf_counter()
        if have and not first:
            first.update(t=now, have=have, cpu=tree_cpu(procs), rcpu=redis_cpu(r))
        if have >= n:
            break
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"{system.name} consumer exited; see {log}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{system.name}: {have} of {n} results after 600 s")
        time.sleep(POLL_S)
    t_done = time.perf_counter()
    cpu1, rcpu1 = tree_cpu(procs), redis_cpu(r)
    stats1 = commandstats(r)
    ours = {"xlen", "exists", "info", "ping", "config"}
    calls = {k: v[0] - stats0.get(k, (0, 0))[0] for k, v in stats1.items() if k not in ours}
    cmds = {k: round(v / n, 3) for k, v in sorted(calls.items()) if v > 0}
    steady_n = n - first["have"]
    return procs, {
        "n": n,
        "publish_s": publish_s,
        "tasks_per_s": steady_n / max(1e-6, t_done - first["t"]),
        "tasks_per_s_from_spawn": n / (t_done - t_spawn),
        "startup_s": first["t"] - t_spawn,
        "consumer_cpu_us_per_task": (cpu1 - first["cpu"]) / max(1, steady_n) * 1e6,
        "redis_cpu_us_per_task": (rcpu1 - rcpu0) / n * 1e6,
        "redis_cmds_per_task": cmds,
        "redis_cmds_per_task_total": round(sum(cmds.values()), 2),
    }


def serial_latency(r: redis.Redis, url: str, system: System, n: int, warmup: int) -> dict[str, Any]:
    r.config_set("notify-keyspace-events", "Kt$")
    tag = uuid.uuid4().hex[:6]

    async def go() -> list[float]:
        sub_r = aredis.Redis.from_url(url)
        pubsub = sub_r.pubsub()
        prefix = "__keyspace@0__:"
        await pubsub.psubscribe(prefix + system.notify)
        await pubsub.get_message(timeout=1.0)  # the psubscribe confirmation
        lat: list[float] = []
        try:
            async with system.publisher(url) as pub:
                for i in range(warmup + n):
                    task_id = f"{system.id_prefix}{tag}.s{i}"
                    if system.results_stream is not None:
                        want = prefix + system.results_stream
                    else:
                        assert system.done_keys is not None
                        want = prefix + system.done_keys([task_id])[0]
                    t0 = time.perf_counter()
                    await pub.publish_one(task_id)
                    while True:
                        msg = await pubsub.get_message(timeout=10.0)
                        if msg is None:
                            raise TimeoutError(f"{system.name}: no result for {task_id} in 10 s")
                        if msg["type"] == "pmessage" and msg["channel"].decode() == want:
                            break
                    if i >= warmup:
                        lat.append((time.perf_counter() - t0) * 1000)
        finally:
            await pubsub.aclose()
            await sub_r.aclose()
        return lat

    try:
        lat = asyncio.run(go())
    finally:
        r.config_set("notify-keyspace-events", "")
    return {"n": n, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": max(lat)}


def run_system(
    args: argparse.Namespace, r: redis.Redis, url: str, system: System, n: int, log: Path
) -> dict[str, Any]:
    r.flushall()  # the private server of this run only
    load = os.getloadavg()
    procs, tp = throughput(r, url, system, n, log)
    try:
        se = serial_latency(r, url, system, args.serial, args.warmup) if args.serial else {}
    finally:
        terminate(*procs)
    return {"system": system.name, "loadavg_before": load, "throughput": tp, "serial": se}


LLM_BENCHMARKS = (
    ["bench/local_inference.py", "--rounds", "5", "--tasks", "4", "--max-tokens", "256",
     "--models", "tiny,small,medium"],
    ["bench/remote_concurrency.py", "--rounds", "3"],
)  # fmt: skip


def llm_benchmarks(url: str) -> int:
    """The providers issue's LLM-side benchmarks, as documented in docs/benchmarks.md, on this
    run's Redis; each prints its own Markdown table."""
    worst = 0
    for argv in LLM_BENCHMARKS:
        cmd = [PROJECT_PY, *argv, "--redis-url", url]
        print(f"\n$ {' '.join(cmd)}", flush=True)
        worst = max(worst, subprocess.run(cmd, cwd=ROOT, check=False).returncode)
    return worst


def parse_tasks_for(spec: str) -> dict[str, int]:
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, n = part.partition("=")
        out[name] = int(n)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=20_000, help="tasks per throughput run")
    ap.add_argument("--tasks-for", default="", help="per-system override, e.g. celery=10000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"each round in order: {SYSTEMS}")
    ap.add_argument("--serial", type=int, default=300, help="serial-latency tasks (0: skip)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--json", type=Path, help="write every measurement here")
    ap.add_argument("--plots", type=Path, default=ROOT / "docs" / "img", help="PNG directory")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument(
        "--llm", action="store_true", help="then run local_inference.py and remote_concurrency.py"
    )
    args = ap.parse_args()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := set(systems) - set(SYSTEMS):
        ap.error(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    tasks_for = parse_tasks_for(args.tasks_for)

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"sop-compare-{os.getpid()}"
    server, url = start_private_redis(tmp)
    os.environ["BENCH_REDIS_URL"] = url  # the peer modules read it when they are imported
    try:
        rc = run(args, systems, tasks_for, url, tmp) if args.rounds else 0
        return max(rc, llm_benchmarks(url)) if args.llm else rc
    finally:
        server.terminate()
        server.wait(timeout=10)


def run(
    args: argparse.Namespace, systems: list[str], tasks_for: dict[str, int], url: str, tmp: Path
) -> int:
    r = redis.Redis.from_url(url)
    env = versions(r)
    env["loadavg_start"] = os.getloadavg()
    print(json.dumps(env), flush=True)
    runs: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for rnd in range(1, args.rounds + 1):
        for name in systems:
            system = make_system(name)
            n = tasks_for.get(name, args.tasks)
            res = run_system(args, r, url, system, n, tmp / f"{name}.log")
            res["round"], res["config"] = rnd, system.config
            runs.append(res)
            tp, se = res["throughput"], res["serial"]
            line = (
                f"round {rnd} {name:10} n={n:6} {tp['tasks_per_s']:7.0f} tasks/s"
                f" (from spawn {tp['tasks_per_s_from_spawn']:6.0f}, startup"
                f" {tp['startup_s']:.2f} s) | cpu us/task consumer"
                f" {tp['consumer_cpu_us_per_task']:4.0f} redis {tp['redis_cpu_us_per_task']:3.0f}"
                f" | redis cmds/task {tp['redis_cmds_per_task_total']:.2f}"
            )
            if se:
                line += f" | serial p50 {se['p50_ms']:.3f} p99 {se['p99_ms']:.3f} ms"
            print(line + f" | load {res['loadavg_before'][0]:.2f}", flush=True)
    env["loadavg_end"] = os.getloadavg()
    took = time.perf_counter() - t_all
    summary = summarise(runs, systems)
    rat = ratios(summary)
    report: dict[str, Any] = {
        "env": env, "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
        "summary": summary, "ratios": rat, "took_s": took,
    }  # fmt: skip
    report["configs"] = {x["system"]: x["config"] for x in runs}
    print(f"\nmedian [min-max] over {args.rounds} rounds; took {took:.0f} s;"
          f" load average {env['loadavg_start']} -> {env['loadavg_end']}\n")  # fmt: skip
    print(markdown(summary))
    print()
    for k, v in rat.items():
        print(f"{k}: {v[0]:.2f} ({v[1]})" if isinstance(v, tuple) else f"{k}: {v:.2f}")
    for s, m in report["configs"].items():
        print(f"config {s}: {m}")
    for s in systems:
        first = next((x for x in runs if x["system"] == s), None)
        if first:
            print(f"{s} redis commands/task (round 1): "
                  f"{json.dumps(first['throughput']['redis_cmds_per_task'])}")  # fmt: skip
    if not args.no_plots and summary:
        note = (
            f"{args.rounds} interleaved rounds, {platform.node() and 'shared'} {os.cpu_count()}-CPU"
            f" VM, load avg {env['loadavg_start'][0]:.2f}→{env['loadavg_end'][0]:.2f};"
            " bench/compare.py"
        )
        for p in plot(summary, args.plots, note):
            print(f"wrote {p}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
    r.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
