"""Pipeline benchmark: one sop-llm worker process against the hand-written redis-py loop.

    .venv/bin/python bench/pipeline.py --tasks 20000 --rounds 3

The consumers run as separate processes on the same Redis, interleaved in rounds (sop, loop,
sop, loop, ...), each run in a fresh namespace (``bench-<hex>``) whose keys are deleted after it
(SCAN + UNLINK of that namespace only; never FLUSHALL). Per run:

1. **throughput**: ``--tasks`` echo tasks (plain pipelined XADDs of ``task.submitted`` entries,
   ~530-byte ``data``, ``max_tokens`` 16) are published to ``{ns}:tasks:default:normal`` before
   the consumer starts; then the consumer is spawned and the results stream is polled (XLEN)
   until it holds them all. ``tasks/s`` is the steady rate between the first and the last result
   (their entry-id times: the Redis clock), so interpreter start-up is not counted; the rate
   from process spawn is reported beside it. CPU seconds of the consumer (``/proc``) and of
   Redis (``INFO cpu``), and the server's ``INFO commandstats``, are sampled around the run.
2. **serial latency**: with the consumer idle, publish one task, wait (blocking XREAD on the
   results stream) for its result, repeat; p50/p99 client-side (``perf_counter``), and the
   Redis commands the consumer ran per task (``INFO commandstats`` delta).
3. **rate latency**: for each ``--rate``, tasks are published on a steady clock (each
   pipeline carries the tasks due since the last one) while a second thread reads the results
   stream; publish-to-result p50/p99 client-side, and by the Redis clock (result entry id minus
   task entry id, 1 ms resolution) as a cross-check.

Systems (``bench/consumers.py``): ``sop`` (``python -m sop_llm.ops.cli worker``, defaults, every
guarantee on), ``sop-256`` (256 slots, the loop's batch size), ``loop``
(``bench/baseline_loop.py``) and ``sop@PATH``, the worker of another checkout (``git worktree
add /tmp/base <commit>``, then ``--systems sop@/tmp/base,sop,loop``) for A/B runs.

``--profile DIR`` adds a py-spy profile of the worker process at full load
(``bench/pyspy_profile.py``; ``--profile-native`` to include C frames).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.consumers import SYSTEMS, known_system, spawn  # noqa: E402
from bench.pyspy_profile import PYSPY, print_profile, profile  # noqa: E402
from bench.redisutil import start_private_redis  # noqa: E402
from bench.sampling import (  # noqa: E402
    commandstats,
    cpu_seconds,
    entry_ms,
    machine_busy,
    own_cpu,
    pct,
    per_task,
    redis_cpu,
    stats_delta,
    terminate,
)
from bench.sop_driver import (  # noqa: E402
    cleanup,
    code_fingerprint,
    last_result_id,
    publish_backlog,
    serial_latency,
    task_fields,
    wait_results,
)
from sop_llm.streams.keys import Keys  # noqa: E402

# --------------------------------------------------------------------------------------------
# measurements


def throughput(
    r: redis.Redis, url: str, keys: Keys, system: str, n: int, log: Path
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    publish_backlog(r, keys, n, keys.namespace)
    stats0, rcpu0 = commandstats(r), redis_cpu(r)
    t_spawn = time.perf_counter()
    proc = spawn(system, url, keys.namespace, log)
    first: dict[str, float] = {}

    def on_poll(have: int) -> None:
        if have and not first:
            first.update(t=time.perf_counter(), cpu=cpu_seconds(proc.pid), have=have)
            first.update(rcpu=redis_cpu(r), busy=machine_busy(), own=own_cpu())
        if proc.poll() is not None:
            raise RuntimeError(f"{system} consumer exited with {proc.returncode}; see {log}")

    polls = wait_results(r, keys, n, timeout=300, on_poll=on_poll)
    t_done = time.perf_counter()
    cpu_done, rcpu1 = cpu_seconds(proc.pid), redis_cpu(r)
    busy, own = machine_busy() - first["busy"], own_cpu() - first["own"]
    # CPU the rest of the machine used during the measured window (0 on a quiet machine);
    # exact with --private-redis, where Redis serves this run only
    other = busy - (cpu_done - first["cpu"]) - (rcpu1 - first["rcpu"]) - own
    delta = stats_delta(stats0, commandstats(r), {"xlen": polls})
    oldest: Any = r.xrange(keys.results, count=1)
    first_ms = entry_ms(oldest[0][0])
    last_ms = entry_ms(last_result_id(r, keys))
    return proc, {
        "tasks_per_s": (n - 1) / max(1e-3, (last_ms - first_ms) / 1000),
        "tasks_per_s_from_spawn": n / (t_done - t_spawn),
        "startup_s": first["t"] - t_spawn,
        "consumer_cpu_us_per_task": (cpu_done - first["cpu"]) / (n - first["have"]) * 1e6,
        "redis_cpu_us_per_task": (rcpu1 - rcpu0) / n * 1e6,
        "other_cpu_cores": max(0.0, other) / max(1e-3, t_done - first["t"]),
        "redis_cmds_per_task": per_task(delta, n),
        "redis_usec_per_task": per_task(delta, n, usec=True),
    }


def rate_latency(url: str, keys: Keys, n: int, rate: float, tag: str) -> dict[str, Any]:
    """Publish ``n`` tasks at ``rate``/s on a steady clock (each pipeline carries the tasks due
    since the previous one) while a second thread reads the results stream.
    Latency = result seen minus pipeline sent, per task."""
    stream = keys.tasks("default", "normal")
    pub_r, read_r = redis.Redis.from_url(url), redis.Redis.from_url(url)
    start_id = last_result_id(read_r, keys)
    sent: dict[str, float] = {}
    task_ms: dict[str, int] = {}
    seen: dict[str, float] = {}
    result_ms: dict[str, int] = {}
    failed: list[Exception] = []

    def reader() -> None:
        last = start_id
        try:
            while len(seen) < n:
                reply: Any = read_r.xread({keys.results: last}, count=512, block=10_000)
                now = time.perf_counter()
                if not reply:
                    raise TimeoutError(f"{len(seen)} of {n} results, then nothing for 10 s")
                for eid, fields in reply[0][1]:
                    last = eid
                    tid = json.loads(fields[b"data"])["task_id"]
                    seen[tid] = now
                    result_ms[tid] = entry_ms(eid)
        except Exception as exc:  # noqa: BLE001 - re-raised by the main thread
            failed.append(exc)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    t0 = time.perf_counter()
    i = 0
    while i < n:
        due = min(n, int((time.perf_counter() - t0) * rate) + 1)
        tids = [f"{keys.namespace}.{tag}{j}" for j in range(i, due)]
        pipe = pub_r.pipeline(transaction=False)
        for tid in tids:
            pipe.xadd(stream, task_fields(tid))
        now = time.perf_counter()
        for tid, eid in zip(tids, pipe.execute(), strict=True):
            sent[tid] = now
            task_ms[tid] = entry_ms(eid)
        i = due
        if i < n:
            time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
    pub_s = time.perf_counter() - t0
    th.join(timeout=60)
    pub_r.close()
    read_r.close()
    if failed:
        raise failed[0]
    lat = [(seen[t] - sent[t]) * 1000 for t in sent]
    lat_redis = [float(result_ms[t] - task_ms[t]) for t in sent]
    return {
        "n": n,
        "rate": rate,
        "achieved_rate": n / pub_s,
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "max_ms": max(lat),
        "redis_clock_p50_ms": pct(lat_redis, 50),
        "redis_clock_p99_ms": pct(lat_redis, 99),
    }


def run_system(
    args: argparse.Namespace, r: redis.Redis, system: str, logdir: Path
) -> dict[str, Any]:
    keys = Keys(f"bench-{uuid.uuid4().hex[:12]}")
    out: dict[str, Any] = {"system": system, "namespace": keys.namespace}
    out["loadavg_before"] = os.getloadavg()
    log = logdir / f"{keys.namespace}.log"  # one namespace per run; sop@PATH holds slashes
    proc = None
    try:
        proc, out["throughput"] = throughput(r, args.redis_url, keys, system, args.tasks, log)
        if args.serial:
            out["serial"] = serial_latency(r, keys, args.serial, warmup=50)
        out["rates"] = [
            rate_latency(args.redis_url, keys, args.rate_tasks, rate, tag=f"r{k}.")
            for k, rate in enumerate(args.rate)
            if args.rate_tasks
        ]
    finally:
        if proc is not None:
            terminate(proc)
        cleanup(r, keys)
    return out


# --------------------------------------------------------------------------------------------
# report


Agg = tuple[float, float, float]


def _rate_stat(k: int, key: str, run: dict[str, Any]) -> float:
    return float(run["rates"][k][key])


def summary(runs: list[dict[str, Any]], system: str) -> dict[str, Any]:
    mine = [x for x in runs if x["system"] == system]

    def agg(get: Callable[[dict[str, Any]], float]) -> Agg:
        vals = [get(x) for x in mine]
        return statistics.median(vals), min(vals), max(vals)

    out: dict[str, Any] = {
        "tasks_per_s": agg(lambda x: x["throughput"]["tasks_per_s"]),
        "tasks_per_s_from_spawn": agg(lambda x: x["throughput"]["tasks_per_s_from_spawn"]),
        "consumer_cpu_us_per_task": agg(lambda x: x["throughput"]["consumer_cpu_us_per_task"]),
        "redis_cpu_us_per_task": agg(lambda x: x["throughput"]["redis_cpu_us_per_task"]),
    }
    if all("serial" in x for x in mine):
        out["serial_p50_ms"] = agg(lambda x: x["serial"]["p50_ms"])
        out["serial_p99_ms"] = agg(lambda x: x["serial"]["p99_ms"])
    for k in range(min(len(x["rates"]) for x in mine)):
        rate = mine[0]["rates"][k]["rate"]
        for q in ("p50_ms", "p99_ms"):
            out[f"rate_{rate:.0f}_{q}"] = agg(functools.partial(_rate_stat, k, q))
    return out


def fmt(v: Agg, digits: int = 0) -> str:
    return f"{v[0]:.{digits}f} [{v[1]:.{digits}f}-{v[2]:.{digits}f}]"


def print_summary(
    args: argparse.Namespace, runs: list[dict[str, Any]], systems: list[str], report: dict[str, Any]
) -> None:
    report["summary"] = {s: summary(runs, s) for s in systems}
    print("\nmedian [min-max] over rounds")
    for s in systems:
        m = report["summary"][s]
        print(f"{s}:")
        print(f"  tasks/s            {fmt(m['tasks_per_s'])}")
        print(f"  tasks/s from spawn {fmt(m['tasks_per_s_from_spawn'])}")
        print(f"  consumer cpu us/task {fmt(m['consumer_cpu_us_per_task'])}")
        print(f"  redis cpu us/task  {fmt(m['redis_cpu_us_per_task'])}")
        for key in m:
            if key.endswith("_ms"):
                print(f"  {key:18} {fmt(m[key], 3)}")
    if {"sop", "loop"} <= set(systems):
        sop, loop = report["summary"]["sop"], report["summary"]["loop"]
        ratio = sop["tasks_per_s"][0] / loop["tasks_per_s"][0]
        per_round = []
        for rnd in range(1, args.rounds + 1):
            this = {x["system"]: x["throughput"]["tasks_per_s"] for x in runs if x["round"] == rnd}
            per_round.append(this["sop"] / this["loop"])
        report["ratio_sop_over_loop"] = {"of_medians": ratio, "per_round": per_round}
        rounds = ", ".join(f"{x:.2f}" for x in per_round)
        print(f"ratio sop/loop (of medians) {ratio:.2f}; per round {rounds}")
    for s in systems:
        first = next(x for x in runs if x["system"] == s)
        tp = first["throughput"]
        cmds, usec = json.dumps(tp["redis_cmds_per_task"]), json.dumps(tp["redis_usec_per_task"])
        print(f"{s} redis commands/task, full load (round 1): {cmds}")
        print(f"{s} redis usec/task, full load (round 1): {usec}")
        if "serial" in first:
            cmds = first["serial"]["redis_cmds_per_task"]
            print(f"{s} redis commands/task, serial (round 1): {json.dumps(cmds)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    ap.add_argument("--tasks", type=int, default=20_000, help="tasks per throughput run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--systems", default="sop,loop", help=f"in this order each round: {SYSTEMS} or sop@PATH"
    )
    ap.add_argument("--serial", type=int, default=2000, help="serial-latency tasks (0: skip)")
    ap.add_argument("--rate", type=float, nargs="*", default=[1000.0, 4000.0], help="tasks/s")
    ap.add_argument("--rate-tasks", type=int, default=3000, help="tasks per rate run (0: skip)")
    ap.add_argument("--profile", type=Path, metavar="DIR", help="py-spy the worker at full load")
    ap.add_argument("--profile-native", action="store_true", help="include C frames")
    ap.add_argument("--profile-tasks", type=int, default=40_000)
    ap.add_argument("--json", type=Path, help="write every measurement here")
    ap.add_argument(
        "--private-redis", action="store_true", help="start a throw-away redis-server for the run"
    )
    args = ap.parse_args()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := [s for s in systems if not known_system(s)]:
        ap.error(f"unknown systems {unknown}; known: {', '.join(SYSTEMS)}, sop@PATH")
    if args.profile and not PYSPY.is_file():
        ap.error(f"--profile needs py-spy beside this interpreter ({PYSPY}): pip install py-spy")

    private = None
    if args.private_redis:
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"sop-bench-redis-{os.getpid()}"
        private, args.redis_url = start_private_redis(tmp)
    try:
        return run(args, systems)
    finally:
        if private is not None:
            private.terminate()
            private.wait(timeout=10)


def run(args: argparse.Namespace, systems: list[str]) -> int:
    r = redis.Redis.from_url(args.redis_url)
    import pydantic

    env = {
        "python": platform.python_version(),
        "redis_server": r.info("server")["redis_version"],
        "redis_py": redis.__version__,
        "hiredis": metadata.version("hiredis"),
        "pydantic": pydantic.VERSION,
        "uvloop": metadata.version("uvloop"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
        "redis_connected_clients": r.info("clients")["connected_clients"],
        "redis_url": args.redis_url,
        "code_root": str(ROOT),
        "code_fingerprint": code_fingerprint(),
    }
    print(json.dumps(env), flush=True)
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / "sop-bench-logs"
    logdir.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for rnd in range(1, args.rounds + 1):
        for system in systems:
            res = run_system(args, r, system, logdir)
            res["round"] = rnd
            runs.append(res)
            tp, se = res["throughput"], res.get("serial", {})
            line = (
                f"round {rnd} {system:7} {tp['tasks_per_s']:6.0f} tasks/s"
                f" (from spawn {tp['tasks_per_s_from_spawn']:5.0f})"
                f" | cpu us/task consumer {tp['consumer_cpu_us_per_task']:3.0f}"
                f" redis {tp['redis_cpu_us_per_task']:3.0f}"
                f" | other cpu {tp['other_cpu_cores']:.2f} cores"
            )
            if se:
                line += f" | serial p50 {se['p50_ms']:.3f} p99 {se['p99_ms']:.3f} ms"
            for ra in res["rates"]:
                line += f" | {ra['rate']:.0f}/s p50 {ra['p50_ms']:.2f} p99 {ra['p99_ms']:.2f} ms"
            print(line + f" | load {res['loadavg_before'][0]:.2f}", flush=True)
    report: dict[str, Any] = {"env": env, "args": {k: str(v) for k, v in vars(args).items()}}
    report["runs"] = runs
    if runs:
        print_summary(args, runs, systems, report)
        took = time.perf_counter() - t_all
        print(f"rounds took {took:.0f} s; load average now {os.getloadavg()}", flush=True)
    if args.profile:
        report["profile"] = profile(
            args.redis_url, r, args.profile, args.profile_tasks, args.profile_native
        )
        print_profile(report["profile"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    r.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
