"""sop-llm against the tools users would pick instead: throughput and latency of a no-op task.

    bench/.venv-peers/bin/python bench/compare.py --tasks 20000 --rounds 3

Runs under the peers' venv (``bench/.venv-peers``: faststream, arq, taskiq(-redis), celery,
matplotlib; their redis-py pins differ from the project's); sop-llm and the hand-written loop run
from the project venv (``.venv/bin/python -m ops.cli worker``, ``bench/baseline_loop.py``). Every
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
import importlib
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import redis
import redis.asyncio as aredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peers.common import payload  # noqa: E402
from bench.redisutil import start_private_redis  # noqa: E402

PROJECT_PY = str(ROOT / ".venv" / "bin" / "python")
POLL_S = 0.005
SYSTEMS = ("sop", "sop-256", "sop-2", "loop", "faststream", "arq", "taskiq", "celery")
PEER_MODULES = {
    "faststream": "bench.peers.faststream_peer",
    "arq": "bench.peers.arq_peer",
    "taskiq": "bench.peers.taskiq_peer",
    "celery": "bench.peers.celery_peer",
}
LABELS = {
    "sop": "sop-llm, 1 worker",
    "sop-256": "sop-llm, 1 worker, 256 slots",
    "sop-2": "sop-llm, 2 workers",
    "loop": "redis-py loop",
    "faststream": "FastStream StreamSub",
    "arq": "arq",
    "taskiq": "taskiq (stream broker)",
    "celery": "Celery (Redis)",
}


def _keys_class() -> Any:
    """sop-llm's key names (``streams/keys.py``), loaded without importing the package."""
    spec = importlib.util.spec_from_file_location("sop_keys", ROOT / "streams" / "keys.py")
    if spec is None or spec.loader is None:
        raise ImportError("streams/keys.py not found")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sop_keys"] = mod
    spec.loader.exec_module(mod)
    return mod.Keys


Keys = _keys_class()


# --------------------------------------------------------------------------------------------
# systems


@dataclass
class System:
    """How the harness drives one system: start consumers, publish, see results."""

    name: str
    config: str
    spawn: Callable[[str, Path], list[subprocess.Popen[bytes]]]
    publisher: Callable[[str], Any]
    done_keys: Callable[[list[str]], list[str]] | None = None
    results_stream: str | None = None
    notify: str = ""
    prepare: Callable[[redis.Redis], None] = field(default=lambda r: None)
    id_prefix: str = ""


class SopPublisher:
    """Plain XADDs of ``task.submitted`` entries, as bench/pipeline.py publishes them."""

    def __init__(self, url: str, stream: str) -> None:
        self.url, self.stream = url, stream

    async def __aenter__(self) -> SopPublisher:
        self.r = aredis.Redis.from_url(self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.r.aclose()

    async def publish(self, task_ids: list[str]) -> None:
        for start in range(0, len(task_ids), 1000):
            pipe = self.r.pipeline(transaction=False)
            for t in task_ids[start : start + 1000]:
                pipe.xadd(self.stream, {"type": "task.submitted", "data": payload(t)})
            await pipe.execute()

    async def publish_one(self, task_id: str) -> None:
        await self.r.xadd(self.stream, {"type": "task.submitted", "data": payload(task_id)})


def _popen(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def sop_system(name: str, procs: int, ns: str, slots: int | None = None) -> System:
    keys = Keys(ns)

    def spawn(url: str, log: Path) -> list[subprocess.Popen[bytes]]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOP_")}
        env.update(SOP_REDIS_URL=url, SOP_NAMESPACE=ns, SOP_LOG_LEVEL="WARNING")
        if slots is not None:  # the loop's batch size: reads of up to half the slots
            env.update(SOP_WORKER_SLOTS=str(slots), SOP_ECHO_SLOTS=str(slots))
        cmd = [PROJECT_PY, "-m", "ops.cli", "worker"]
        return [_popen(cmd, env, log) for _ in range(procs)]

    config = "defaults (64 slots" if slots is None else f"SOP_WORKER_SLOTS={slots} ({slots} slots"
    return System(
        name=name,
        config=f"{procs} x `python -m ops.cli worker`, {config}, every guarantee on)",
        spawn=spawn,
        publisher=lambda url: SopPublisher(url, keys.tasks("default", "normal")),
        results_stream=keys.results,
        notify=keys.results,
        id_prefix=f"{ns}.",
    )


def loop_system(ns: str) -> System:
    keys = Keys(ns)

    def spawn(url: str, log: Path) -> list[subprocess.Popen[bytes]]:
        script = str(ROOT / "bench" / "baseline_loop.py")
        cmd = [PROJECT_PY, script, "--redis-url", url, "--namespace", ns]
        return [_popen(cmd, dict(os.environ), log)]

    return System(
        name="loop",
        config="bench/baseline_loop.py: XREADGROUP COUNT 256, one pipeline of writes per batch",
        spawn=spawn,
        publisher=lambda url: SopPublisher(url, keys.tasks("default", "normal")),
        results_stream=keys.results,
        notify=keys.results,
        id_prefix=f"{ns}.",
    )


def peer_system(name: str) -> System:
    mod: ModuleType = importlib.import_module(PEER_MODULES[name])

    def spawn(url: str, log: Path) -> list[subprocess.Popen[bytes]]:
        env = dict(os.environ, BENCH_REDIS_URL=url, PYTHONPATH=str(ROOT))
        return [_popen(mod.worker_cmd(sys.executable, url), env, log)]

    def prepare(r: redis.Redis) -> None:
        if name == "faststream":  # the group must exist before the backlog is published
            r.xgroup_create(mod.TASKS, mod.GROUP, id="0", mkstream=True)

    return System(
        name=name,
        config=mod.CONFIG,
        spawn=spawn,
        publisher=mod.Publisher,
        done_keys=getattr(mod, "done_keys", None),
        results_stream=getattr(mod, "RESULTS_STREAM", None),
        notify=mod.NOTIFY,
        prepare=prepare,
        id_prefix="tq." if name == "taskiq" else f"{name}.",
    )


# --------------------------------------------------------------------------------------------
# helpers


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(procs: list[subprocess.Popen[bytes]]) -> float:
    """CPU seconds of the consumer processes and their direct children (taskiq forks one)."""
    pids = [p.pid for p in procs]
    for p in procs:
        try:
            kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
        except FileNotFoundError:
            kids = []
        pids += [int(k) for k in kids]
    return sum(cpu_seconds(pid) for pid in pids)


def redis_cpu(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def commandstats(r: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()}


def terminate(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class DoneCounter:
    """How many of the tasks have a result: XLEN of a results stream, or EXISTS over result
    keys in task order (a prefix of fully-done chunks is not asked again)."""

    def __init__(self, r: redis.Redis, system: System, task_ids: list[str]) -> None:
        self.r, self.stream = r, system.results_stream
        self.keys = system.done_keys(task_ids) if system.done_keys else []
        self.done_prefix = 0
        self.calls = 0

    def count(self) -> int:
        self.calls += 1
        if self.stream is not None:
            return int(self.r.xlen(self.stream))
        while self.done_prefix < len(self.keys):
            chunk = self.keys[self.done_prefix : self.done_prefix + 1000]
            have = int(self.r.exists(*chunk))
            if have < len(chunk):
                return self.done_prefix + have
            self.done_prefix += len(chunk)
        return len(self.keys)


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
    cmds = {k: v - stats0.get(k, 0) for k, v in stats1.items() if k not in ours}
    cmds = {k: round(v / n, 3) for k, v in sorted(cmds.items()) if v > 0}
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
        terminate(procs)
    return {"system": system.name, "loadavg_before": load, "throughput": tp, "serial": se}


# --------------------------------------------------------------------------------------------
# report


def agg(vals: list[float]) -> list[float]:
    return [statistics.median(vals), min(vals), max(vals)]


def summarise(runs: list[dict[str, Any]], systems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in systems:
        mine = [x for x in runs if x["system"] == s]
        if not mine:
            continue
        m: dict[str, Any] = {"n": mine[0]["throughput"]["n"]}
        for k in ("tasks_per_s", "tasks_per_s_from_spawn", "consumer_cpu_us_per_task",
                  "redis_cpu_us_per_task", "redis_cmds_per_task_total"):  # fmt: skip
            m[k] = agg([x["throughput"][k] for x in mine])
        if all(x["serial"] for x in mine):
            m["serial_p50_ms"] = agg([x["serial"]["p50_ms"] for x in mine])
            m["serial_p99_ms"] = agg([x["serial"]["p99_ms"] for x in mine])
        out[s] = m
    return out


def ratios(summary: dict[str, Any]) -> dict[str, Any]:
    tp = {s: v["tasks_per_s"][0] for s, v in summary.items()}
    out: dict[str, Any] = {}
    if "sop" not in tp:
        return out
    peers = {s: v for s, v in tp.items() if s in PEER_MODULES}
    task_queues = {s: v for s, v in peers.items() if s in ("arq", "taskiq", "celery")}
    if "loop" in tp:
        out["sop/loop"] = tp["sop"] / tp["loop"]
        for other in ("sop-256", "sop-2"):
            if other in tp:
                out[f"{other}/loop"] = tp[other] / tp["loop"]
    if peers:
        best = max(peers, key=peers.__getitem__)
        out["sop/best peer"] = (tp["sop"] / peers[best], best)
    if task_queues:
        best = max(task_queues, key=task_queues.__getitem__)
        out["sop/best of arq,taskiq,celery"] = (tp["sop"] / task_queues[best], best)
    return out


def fmt(v: list[float], digits: int = 0) -> str:
    return f"{v[0]:,.{digits}f} [{v[1]:,.{digits}f}-{v[2]:,.{digits}f}]"


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| system | N | tasks/s | consumer CPU µs/task | Redis CPU µs/task "
        "| Redis commands/task | serial p50 ms | serial p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s, m in summary.items():
        row = [
            LABELS[s], f"{m['n']:,}", fmt(m["tasks_per_s"]), fmt(m["consumer_cpu_us_per_task"]),
            fmt(m["redis_cpu_us_per_task"]), f"{m['redis_cmds_per_task_total'][0]:.2f}",
        ]  # fmt: skip
        if "serial_p50_ms" in m:
            row += [fmt(m["serial_p50_ms"], 2), fmt(m["serial_p99_ms"], 2)]
        else:
            row += ["-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], outdir: Path, note: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    labels = [LABELS[s] for s in names]
    colors = ["#1f6feb" if s.startswith("sop") else "#8b949e" for s in names]
    colors = ["#2da44e" if s == "loop" else c for s, c in zip(names, colors, strict=True)]
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(9, 4.5))
    med = [summary[s]["tasks_per_s"][0] for s in names]
    err = [
        [m - summary[s]["tasks_per_s"][1] for s, m in zip(names, med, strict=True)],
        [summary[s]["tasks_per_s"][2] - m for s, m in zip(names, med, strict=True)],
    ]
    ax.barh(labels, med, xerr=err, color=colors, capsize=3)
    for y, s in enumerate(names):
        # the label goes past the max whisker, so the two never overlap
        ax.text(summary[s]["tasks_per_s"][2], y, f"  {med[y]:,.0f}", va="center", fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("tasks/s (median of rounds; whiskers: min-max)")
    ax.set_title("No-op task throughput, publish-to-result (one process unless stated)")
    ax.set_xlim(0, max(summary[s]["tasks_per_s"][2] for s in names) * 1.25)
    fig.text(0.01, 0.01, note, fontsize=7, color="#555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    paths.append(outdir / "benchmarks-throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    lat = [s for s in names if "serial_p50_ms" in summary[s]]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ys = range(len(lat))
    p50 = [summary[s]["serial_p50_ms"][0] for s in lat]
    p99 = [summary[s]["serial_p99_ms"][0] for s in lat]
    ax.barh([y - 0.2 for y in ys], p50, height=0.4, label="p50", color="#1f6feb")
    ax.barh([y + 0.2 for y in ys], p99, height=0.4, label="p99", color="#8b949e")
    for y, a, b in zip(ys, p50, p99, strict=True):
        ax.text(a, y - 0.2, f" {a:.2f}", va="center", fontsize=8)
        ax.text(b, y + 0.2, f" {b:.2f}", va="center", fontsize=8)
    ax.set_yticks(list(ys), [LABELS[s] for s in lat])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("publish-to-result latency, one task at a time (ms, log scale; median of rounds)")
    ax.set_title("Serial latency")
    ax.legend(loc="lower right")
    fig.text(0.01, 0.01, note, fontsize=7, color="#555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    paths.append(outdir / "benchmarks-latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def versions(r: redis.Redis) -> dict[str, Any]:
    peers = ["faststream", "arq", "taskiq", "taskiq-redis", "celery", "kombu", "redis",
             "hiredis", "uvloop", "pydantic", "matplotlib"]  # fmt: skip
    out: dict[str, Any] = {"peers_venv": {}}
    for p in peers:
        try:
            out["peers_venv"][p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out["peers_venv"][p] = None
    code = (
        "import json; from importlib import metadata as m; print(json.dumps({p: m.version(p) "
        "for p in ('sop-llm', 'redis', 'hiredis', 'uvloop', 'pydantic')}))"
    )
    done = subprocess.run([PROJECT_PY, "-c", code], capture_output=True, text=True, check=False)
    out["project_venv"] = json.loads(done.stdout) if done.returncode == 0 else done.stderr
    out["python"] = platform.python_version()
    out["redis_server"] = r.info("server")["redis_version"]
    out["platform"] = platform.platform()
    out["cpus"] = os.cpu_count()
    return out


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
            ns = f"bench-{uuid.uuid4().hex[:12]}"
            if name in ("sop", "sop-2", "sop-256"):
                slots = 256 if name == "sop-256" else None
                system = sop_system(name, 2 if name == "sop-2" else 1, ns, slots)
            elif name == "loop":
                system = loop_system(ns)
            else:
                system = peer_system(name)
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
    report = {"env": env, "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
              "summary": summary, "ratios": rat, "took_s": took}  # fmt: skip
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
