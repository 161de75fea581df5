"""Pipeline benchmark: one sop-llm worker process against the hand-written redis-py loop.

    .venv/bin/python bench/pipeline.py --tasks 20000 --rounds 3

Both consumers run as separate processes on the same Redis, interleaved in rounds (sop, loop,
sop, loop, ...), each run in a fresh namespace (``bench-<hex>``) whose keys are deleted after
it (SCAN + UNLINK of that namespace only). Per run:

1. **throughput**: ``--tasks`` echo tasks (plain pipelined XADDs, ~500-byte ``data``,
   ``max_tokens`` 16) are published to ``{ns}:tasks:default:normal`` before the consumer starts;
   then the consumer is spawned and the results stream is polled (XLEN) until it holds them all.
   ``tasks/s`` is the steady rate between the first and the last result (entry-id times, the
   Redis clock), so interpreter start-up is not counted; the rate from process spawn is
   reported beside it. CPU seconds of the consumer (``/proc``) and of Redis (``INFO cpu``) and
   the server's ``INFO commandstats`` are sampled around the run.
2. **serial latency**: with the consumer idle, publish one task, wait (blocking XREAD on the
   results stream) for its result, repeat; p50/p99 measured client-side (``perf_counter``).
3. **rate latency**: ``--rate`` tasks/s published on a steady clock by one thread while another
   thread reads the results stream; publish-to-result p50/p99 client-side (and by the Redis
   clock: result entry id minus task entry id, 1 ms resolution).

``--trips`` adds an in-process run of the sop-llm worker (``ops.app.build_worker``) with a
counting hook on ``redis.asyncio`` connections *in this process only*: network round trips
and commands per task, by kind, at full load and at serial load. ``--profile DIR`` adds a
py-spy profile of the worker process at full load. Nothing in the production code is changed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streams.keys import TASK_GROUP, Keys  # noqa: E402

PROMPT_WORDS = (
    "the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing matches "
    "between sphinxes of black quartz and a jovial band of lumberjacks packs my box with five "
    "dozen liquor jugs before the lazy dog wakes up and the fox runs home through the forest past "
    "the river where the mist hangs low over the water and the heron waits for fish at dawn while "
    "the village sleeps and the baker lights his oven for the morning bread that feeds everyone"
)
POLL_S = 0.005


# --------------------------------------------------------------------------------------------
# helpers


def task_data(task_id: str) -> str:
    return json.dumps(
        {"v": 1, "task_id": task_id, "model": "echo", "prompt": PROMPT_WORDS, "max_tokens": 16},
        separators=(",", ":"),
    )


def entry_ms(entry_id: bytes | str) -> int:
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(raw.split("-", 1)[0])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def commandstats(r: redis.Redis) -> dict[str, tuple[int, int]]:
    """``{command: (calls, usec)}`` from INFO commandstats (Lua-internal calls included)."""
    out = {}
    for name, stat in r.info("commandstats").items():
        out[name.removeprefix("cmdstat_")] = (int(stat["calls"]), int(stat["usec"]))
    return out


def stats_delta(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], ours: dict[str, int]
) -> dict[str, tuple[int, int]]:
    """Commands the consumer caused: the server delta minus what this script sent itself."""
    out = {}
    for name, (calls, usec) in after.items():
        c0, u0 = before.get(name, (0, 0))
        calls, usec = calls - c0 - ours.get(name, 0), usec - u0
        if calls > 0:
            out[name] = (calls, usec)
    return out


def cleanup(r: redis.Redis, keys: Keys) -> int:
    """Delete every key of the namespace (SCAN + UNLINK); nothing else is touched."""
    n = 0
    batch: list[bytes] = []
    for key in r.scan_iter(match=keys.all_pattern, count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            n += r.unlink(*batch)
            batch = []
    if batch:
        n += r.unlink(*batch)
    return n


def publish_backlog(r: redis.Redis, keys: Keys, n: int, prefix: str) -> None:
    stream = keys.tasks("default", "normal")
    for start in range(0, n, 1000):
        pipe = r.pipeline(transaction=False)
        for i in range(start, min(n, start + 1000)):
            pipe.xadd(stream, {"type": "task.submitted", "data": task_data(f"{prefix}.{i}")})
        pipe.execute()


def wait_results(r: redis.Redis, keys: Keys, n: int, timeout: float, on_poll: Callable[[int], None] | None = None) -> int:
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        have = r.xlen(keys.results)
        polls += 1
        if on_poll is not None:
            on_poll(have)
        if have >= n:
            return polls
        if time.monotonic() > deadline:
            raise TimeoutError(f"{have} of {n} results after {timeout} s")
        time.sleep(POLL_S)


def last_result_id(r: redis.Redis, keys: Keys) -> bytes:
    newest = r.xrevrange(keys.results, count=1)
    return newest[0][0] if newest else b"0-0"


# --------------------------------------------------------------------------------------------
# consumers


def spawn(system: str, url: str, ns: str, log: Path) -> subprocess.Popen[bytes]:
    if system == "sop":
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOP_")}
        env.update(SOP_REDIS_URL=url, SOP_NAMESPACE=ns, SOP_LOG_LEVEL="WARNING")
        cmd = [sys.executable, "-m", "ops.cli", "worker"]
    else:
        env = dict(os.environ)
        cmd = [sys.executable, str(ROOT / "bench" / "baseline_loop.py"), "--redis-url", url, "--namespace", ns]
    with log.open("ab") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------
# the three measurements


def throughput(r: redis.Redis, url: str, keys: Keys, system: str, n: int, log: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    publish_backlog(r, keys, n, keys.namespace)
    stats0, rcpu0 = commandstats(r), redis_cpu(r)
    t_spawn = time.perf_counter()
    proc = spawn(system, url, keys.namespace, log)
    first: dict[str, float] = {}

    def on_poll(have: int) -> None:
        if have and not first:
            first.update(t=time.perf_counter(), cpu=cpu_seconds(proc.pid), rcpu=redis_cpu(r), have=have)
        if proc.poll() is not None:
            raise RuntimeError(f"{system} consumer exited with {proc.returncode}; see {log}")

    polls = wait_results(r, keys, n, timeout=300, on_poll=on_poll)
    t_done = time.perf_counter()
    cpu_done, rcpu1 = cpu_seconds(proc.pid), redis_cpu(r)
    stats1 = commandstats(r)
    first_ms = entry_ms(r.xrange(keys.results, count=1)[0][0])
    last_ms = entry_ms(last_result_id(r, keys))
    steady_n = n - first["have"]
    ours = {"xlen": polls}
    delta = stats_delta(stats0, stats1, ours)
    delta.pop("info", None)
    return proc, {
        "tasks_per_s": (n - 1) / max(1e-3, (last_ms - first_ms) / 1000),
        "tasks_per_s_from_spawn": n / (t_done - t_spawn),
        "startup_s": first["t"] - t_spawn,
        "consumer_cpu_us_per_task": (cpu_done - first["cpu"]) / steady_n * 1e6,
        "redis_cpu_us_per_task": (rcpu1 - rcpu0) / n * 1e6,
        "redis_cmds_per_task": {k: round(c / n, 3) for k, (c, _) in sorted(delta.items())},
        "redis_usec_per_task": {k: round(u / n, 2) for k, (_, u) in sorted(delta.items())},
    }


def serial_latency(r: redis.Redis, keys: Keys, n: int, warmup: int, tag: str = "s") -> dict[str, Any]:
    stream = keys.tasks("default", "normal")
    last = last_result_id(r, keys)
    lat: list[float] = []
    for i in range(warmup + n):
        task_id = f"{keys.namespace}.{tag}{i}"
        needle = f'"task_id":"{task_id}"'.encode()
        t0 = time.perf_counter()
        r.xadd(stream, {"type": "task.submitted", "data": task_data(task_id)})
        done = False
        while not done:
            reply = r.xread({keys.results: last}, count=16, block=5000)
            if not reply:
                raise TimeoutError(f"no result for {task_id} within 5 s")
            for eid, fields in reply[0][1]:
                last = eid
                done = done or needle in fields[b"data"]
        if i >= warmup:
            lat.append((time.perf_counter() - t0) * 1000)
    return {"n": n, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": max(lat)}


def rate_latency(url: str, keys: Keys, n: int, rate: float) -> dict[str, Any]:
    """Publish ``n`` tasks at ``rate``/s (one XADD per task, on a steady clock); a second
    thread reads the results stream. Latency = result seen minus XADD sent."""
    stream = keys.tasks("default", "normal")
    pub_r, read_r = redis.Redis.from_url(url), redis.Redis.from_url(url)
    start_id = last_result_id(read_r, keys)
    sent: dict[str, float] = {}
    task_ms: dict[str, int] = {}
    seen: dict[str, float] = {}
    result_ms: dict[str, int] = {}
    failed: list[BaseException] = []

    def reader() -> None:
        last = start_id
        try:
            while len(seen) < n:
                reply = read_r.xread({keys.results: last}, count=512, block=10_000)
                now = time.perf_counter()
                if not reply:
                    raise TimeoutError(f"{len(seen)} of {n} results, then nothing for 10 s")
                for eid, fields in reply[0][1]:
                    last = eid
                    tid = json.loads(fields[b"data"])["task_id"]
                    seen[tid] = now
                    result_ms[tid] = entry_ms(eid)
        except BaseException as exc:  # handed to the main thread
            failed.append(exc)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    t0 = time.perf_counter()
    for i in range(n):
        due = t0 + i / rate
        while (left := due - time.perf_counter()) > 0:
            time.sleep(left if left > 0.0005 else 0)
        tid = f"{keys.namespace}.r{i}"
        data = task_data(tid)
        sent[tid] = time.perf_counter()
        task_ms[tid] = entry_ms(pub_r.xadd(stream, {"type": "task.submitted", "data": data}))
    pub_s = time.perf_counter() - t0
    th.join(timeout=60)
    pub_r.close()
    read_r.close()
    if failed:
        raise failed[0]
    lat = [(seen[t] - sent[t]) * 1000 for t in sent]
    lat_redis = [float(result_ms[t] - task_ms[t]) for t in sent]
    return {
        "n": n, "rate": rate, "achieved_rate": n / pub_s,
        "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": max(lat),
        "redis_clock_p50_ms": pct(lat_redis, 50), "redis_clock_p99_ms": pct(lat_redis, 99),
    }  # fmt: skip


def run_system(args: argparse.Namespace, r: redis.Redis, system: str, logdir: Path) -> dict[str, Any]:
    keys = Keys(f"bench-{uuid.uuid4().hex[:12]}")
    out: dict[str, Any] = {"system": system, "namespace": keys.namespace, "loadavg_before": os.getloadavg()}
    log = logdir / f"{keys.namespace}-{system}.log"
    proc = None
    try:
        proc, out["throughput"] = throughput(r, args.redis_url, keys, system, args.tasks, log)
        if args.serial:
            out["serial"] = serial_latency(r, keys, args.serial, warmup=50)
        if args.rate_tasks:
            out["rate"] = rate_latency(args.redis_url, keys, args.rate_tasks, args.rate)
    finally:
        if proc is not None:
            terminate(proc)
        cleanup(r, keys)
    return out


# --------------------------------------------------------------------------------------------
# round trips, counted in this process with a hook on redis.asyncio connections


def _parse_request(buf: bytes) -> list[tuple[str, bytes]]:
    """(command name, second argument) of each command in a packed RESP request."""
    out = []
    i, n = 0, len(buf)
    while i < n:
        j = buf.index(b"\r\n", i)
        argc = int(buf[i + 1 : j])
        i = j + 2
        head: list[bytes] = []
        for k in range(argc):
            j = buf.index(b"\r\n", i)
            size = int(buf[i + 1 : j])
            i = j + 2
            if k < 2:
                head.append(buf[i : i + size])
            i += size + 2
        out.append((head[0].decode().upper(), head[1] if len(head) > 1 else b""))
    return out


class TripCounter:
    def __init__(self) -> None:
        from streams import scripts  # noqa: PLC0415 - only the trips mode needs it

        self.names = {
            s.sha.encode(): s.name.upper()
            for s in (scripts.BEGIN_SCRIPT, scripts.FINISH_SCRIPT, scripts.READ_SCRIPT,
                      scripts.HEADS_SCRIPT, scripts.SUBMIT_SCRIPT)
        }  # fmt: skip
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.trips: collections.Counter[str] = collections.Counter()
            self.cmds: collections.Counter[str] = collections.Counter()

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        with self.lock:
            return dict(self.trips), dict(self.cmds)

    def record(self, command: bytes | str | Iterable[bytes]) -> None:
        if isinstance(command, str):
            command = command.encode()
        buf = command if isinstance(command, bytes) else b"".join(command)
        kinds = []
        for name, arg in _parse_request(buf):
            kinds.append(f"EVALSHA {self.names.get(arg, '?')}" if name == "EVALSHA" else name)
        kind = kinds[0] if len(set(kinds)) == 1 else "mixed pipeline"
        if len(kinds) > 1:
            kind += " (pipeline)"
        with self.lock:
            self.trips[kind] += 1
            self.cmds[kind] += len(kinds)

    def install(self) -> None:
        from redis.asyncio.connection import AbstractConnection  # noqa: PLC0415

        original = AbstractConnection.send_packed_command
        counter = self

        async def counted(self: Any, command: Any, check_health: bool = True) -> None:
            counter.record(command)
            await original(self, command, check_health)

        AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]


def count_round_trips(args: argparse.Namespace, r: redis.Redis) -> dict[str, Any]:
    from ops import logs  # noqa: PLC0415
    from ops.app import build_registry, build_worker, redis_client  # noqa: PLC0415
    from ops.settings import Settings  # noqa: PLC0415

    counter = TripCounter()
    counter.install()
    keys = Keys(f"bench-{uuid.uuid4().hex[:12]}")
    settings = Settings(redis_url=args.redis_url, namespace=keys.namespace, log_level="WARNING")
    logs.configure("WARNING", "json")
    state: dict[str, Any] = {}
    started = threading.Event()

    async def run_worker() -> None:
        client = redis_client(args.redis_url)
        worker = build_worker(settings, client, build_registry(settings))
        stop = asyncio.Event()
        state.update(loop=asyncio.get_running_loop(), stop=stop, worker=worker)
        started.set()
        try:
            await worker.run(stop)
        finally:
            await client.aclose()

    def thread_main() -> None:
        try:
            import uvloop  # noqa: PLC0415

            uvloop.run(run_worker())
        except ImportError:
            asyncio.run(run_worker())

    n = args.trips_tasks
    out: dict[str, Any] = {"namespace": keys.namespace}
    try:
        publish_backlog(r, keys, n, keys.namespace)
        stats0 = commandstats(r)
        th = threading.Thread(target=thread_main, daemon=True)
        th.start()
        started.wait(30)
        polls = wait_results(r, keys, n, timeout=300)
        stats1 = commandstats(r)
        trips, cmds = counter.snapshot()
        delta = stats_delta(stats0, stats1, {"xlen": polls, "info": 2})
        delta.pop("info", None)
        out["full"] = _trip_report(n, trips, cmds, delta)

        # serial: one task at a time against the idle worker
        m = args.trips_serial
        serial_latency(r, keys, 20, warmup=0, tag="w")
        counter.reset()
        stats0 = commandstats(r)
        t0 = time.perf_counter()
        serial_latency(r, keys, m, warmup=0, tag="s")
        elapsed = time.perf_counter() - t0
        stats1 = commandstats(r)
        trips, cmds = counter.snapshot()
        delta = stats_delta(stats0, stats1, {"xadd": m, "xread": m, "xrevrange": 1, "info": 2})
        delta.pop("info", None)
        out["serial"] = _trip_report(m, trips, cmds, delta)
        out["serial"]["seconds"] = elapsed
    finally:
        if "loop" in state:
            state["loop"].call_soon_threadsafe(state["stop"].set)
            th.join(timeout=30)
        cleanup(r, keys)
    return out


def _trip_report(n: int, trips: dict[str, int], cmds: dict[str, int], delta: dict[str, tuple[int, int]]) -> dict[str, Any]:
    return {
        "tasks": n,
        "round_trips_per_task": sum(trips.values()) / n,
        "client_cmds_per_task": sum(cmds.values()) / n,
        "round_trips": dict(sorted(trips.items(), key=lambda kv: -kv[1])),
        "client_cmds": dict(sorted(cmds.items(), key=lambda kv: -kv[1])),
        "redis_cmds_per_task": {k: round(c / n, 3) for k, (c, _) in sorted(delta.items())},
    }


# --------------------------------------------------------------------------------------------
# profile: py-spy on the worker process at full load


def profile(args: argparse.Namespace, r: redis.Redis, outdir: Path) -> dict[str, Any]:
    outdir.mkdir(parents=True, exist_ok=True)
    pyspy = Path(sys.executable).with_name("py-spy")
    keys = Keys(f"bench-{uuid.uuid4().hex[:12]}")
    raw = outdir / "pyspy-worker.txt"
    proc = spawn("sop", args.redis_url, keys.namespace, outdir / "worker.log")
    spy = None
    try:
        # attach once the worker is idle and ready, so start-up does not enter the profile
        deadline = time.monotonic() + 30
        while not any(True for _ in r.scan_iter(match=keys.worker("*"), count=100)):
            if time.monotonic() > deadline:
                raise TimeoutError("worker did not start")
            time.sleep(0.05)
        spy = subprocess.Popen(
            [str(pyspy), "record", "--pid", str(proc.pid), "--rate", "250", "--nonblocking",
             "--format", "raw", "--output", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(1.0)
        publish_backlog(r, keys, args.profile_tasks, keys.namespace)
        wait_results(r, keys, args.profile_tasks, timeout=300)
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=30)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        terminate(proc)
        cleanup(r, keys)
    return summarise_profile(raw)


def summarise_profile(raw: Path, top: int = 25) -> dict[str, Any]:
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        self_t[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return {
        "samples": total,
        "self": [(f, round(100 * c / total, 1)) for f, c in self_t.most_common(top)],
        "inclusive": [(f, round(100 * c / total, 1)) for f, c in incl.most_common(top * 2)],
    }


def _frame(frame: str) -> str:
    """``func (path/to/file.py:123)`` → ``func (file.py)``, so lines of one function merge."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "python3.11/", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


# --------------------------------------------------------------------------------------------


def summary(runs: list[dict[str, Any]], system: str) -> dict[str, Any]:
    mine = [x for x in runs if x["system"] == system]

    def agg(get: Callable[[dict[str, Any]], float]) -> tuple[float, float, float]:
        vals = [get(x) for x in mine]
        return statistics.median(vals), min(vals), max(vals)

    out = {
        "tasks_per_s": agg(lambda x: x["throughput"]["tasks_per_s"]),
        "tasks_per_s_from_spawn": agg(lambda x: x["throughput"]["tasks_per_s_from_spawn"]),
        "consumer_cpu_us_per_task": agg(lambda x: x["throughput"]["consumer_cpu_us_per_task"]),
        "redis_cpu_us_per_task": agg(lambda x: x["throughput"]["redis_cpu_us_per_task"]),
    }
    if all("serial" in x for x in mine):
        out["serial_p50_ms"] = agg(lambda x: x["serial"]["p50_ms"])
        out["serial_p99_ms"] = agg(lambda x: x["serial"]["p99_ms"])
    if all("rate" in x for x in mine):
        out["rate_p50_ms"] = agg(lambda x: x["rate"]["p50_ms"])
        out["rate_p99_ms"] = agg(lambda x: x["rate"]["p99_ms"])
    return out


def fmt(v: tuple[float, float, float], digits: int = 0) -> str:
    return f"{v[0]:.{digits}f} [{v[1]:.{digits}f}-{v[2]:.{digits}f}]"


def print_summary(args: argparse.Namespace, runs: list[dict[str, Any]], systems: list[str], report: dict[str, Any]) -> None:
    report["summary"] = {s: summary(runs, s) for s in systems}
    print("\nsystem  tasks/s median [min-max]   serial p50 / p99 ms       "
          f"rate {args.rate:.0f}/s p50 / p99 ms    cpu us/task (consumer, redis)")  # fmt: skip
    for s in systems:
        m = report["summary"][s]
        print(
            f"{s:6}  {fmt(m['tasks_per_s']):24}  "
            f"{fmt(m.get('serial_p50_ms', (0, 0, 0)), 3)} / {fmt(m.get('serial_p99_ms', (0, 0, 0)), 3)}  "
            f"{fmt(m.get('rate_p50_ms', (0, 0, 0)), 2)} / {fmt(m.get('rate_p99_ms', (0, 0, 0)), 2)}  "
            f"{m['consumer_cpu_us_per_task'][0]:.0f}, {m['redis_cpu_us_per_task'][0]:.0f}"
        )
    if {"sop", "loop"} <= set(systems):
        ratio = report["summary"]["sop"]["tasks_per_s"][0] / report["summary"]["loop"]["tasks_per_s"][0]
        per_round = []
        for rnd in range(1, args.rounds + 1):
            sop = next(x for x in runs if x["round"] == rnd and x["system"] == "sop")
            loop = next(x for x in runs if x["round"] == rnd and x["system"] == "loop")
            per_round.append(sop["throughput"]["tasks_per_s"] / loop["throughput"]["tasks_per_s"])
        report["ratio_sop_over_loop"] = {"of_medians": ratio, "per_round": per_round}
        print(f"ratio sop/loop (medians) {ratio:.2f}; per round {', '.join(f'{x:.2f}' for x in per_round)}")
    for s in systems:
        first = next(x for x in runs if x["system"] == s)
        print(f"{s} redis commands/task (round 1): {json.dumps(first['throughput']['redis_cmds_per_task'])}")
        print(f"{s} redis usec/task (round 1): {json.dumps(first['throughput']['redis_usec_per_task'])}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--tasks", type=int, default=20_000, help="tasks per throughput run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--systems", default="sop,loop", help="comma-separated, run in this order each round")
    ap.add_argument("--serial", type=int, default=2000, help="tasks in the serial latency run (0: skip)")
    ap.add_argument("--rate", type=float, default=1000.0, help="tasks/s of the rate latency run")
    ap.add_argument("--rate-tasks", type=int, default=3000, help="tasks in the rate latency run (0: skip)")
    ap.add_argument("--trips", action="store_true", help="count round trips per task (in-process worker)")
    ap.add_argument("--trips-tasks", type=int, default=5000)
    ap.add_argument("--trips-serial", type=int, default=500)
    ap.add_argument("--profile", type=Path, metavar="DIR", help="py-spy the worker at full load, output here")
    ap.add_argument("--profile-tasks", type=int, default=40_000)
    ap.add_argument("--json", type=Path, help="write every measurement here")
    args = ap.parse_args()

    r = redis.Redis.from_url(args.redis_url)
    server = r.info("server")
    env = {
        "python": platform.python_version(), "redis_server": server["redis_version"],
        "redis_py": redis.__version__, "cpus": os.cpu_count(), "platform": platform.platform(),
        "loadavg_start": os.getloadavg(), "connected_clients": r.info("clients")["connected_clients"],
    }  # fmt: skip
    print(json.dumps(env))
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / "sop-bench-logs"
    logdir.mkdir(parents=True, exist_ok=True)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    runs: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for rnd in range(1, args.rounds + 1):
        for system in systems:
            res = run_system(args, r, system, logdir)
            res["round"] = rnd
            runs.append(res)
            tp, se, ra = res["throughput"], res.get("serial", {}), res.get("rate", {})
            print(
                f"round {rnd} {system:4} {tp['tasks_per_s']:8.0f} tasks/s "
                f"(from spawn {tp['tasks_per_s_from_spawn']:.0f}) | cpu/task consumer "
                f"{tp['consumer_cpu_us_per_task']:.0f} us redis {tp['redis_cpu_us_per_task']:.0f} us | "
                f"serial p50 {se.get('p50_ms', float('nan')):.3f} p99 {se.get('p99_ms', float('nan')):.3f} ms | "
                f"rate {ra.get('rate', 0):.0f}/s p50 {ra.get('p50_ms', float('nan')):.2f} "
                f"p99 {ra.get('p99_ms', float('nan')):.2f} ms | load {res['loadavg_before'][0]:.2f}",
                flush=True,
            )
    report: dict[str, Any] = {"env": env, "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}
    if runs:
        print_summary(args, runs, systems, report)
        print(f"benchmark rounds took {time.perf_counter() - t_all:.0f} s; load now {os.getloadavg()}")
    if args.trips:
        report["trips"] = count_round_trips(args, r)
        print("round trips:", json.dumps(report["trips"], indent=1))
    if args.profile:
        report["profile"] = profile(args, r, args.profile)
        prof = report["profile"]
        print(f"profile: {prof['samples']} samples")
        print("  self:")
        for f, p in prof["self"]:
            print(f"    {p:5.1f}%  {f}")
        print("  inclusive:")
        for f, p in prof["inclusive"]:
            print(f"    {p:5.1f}%  {f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    r.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
