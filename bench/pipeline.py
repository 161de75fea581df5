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

Systems: ``sop`` (``python -m ops.cli worker``, defaults, every guarantee on) and ``loop``
(``bench/baseline_loop.py``); four what-ifs change no production code: ``sop-gc`` (the same
worker started after ``gc.freeze()``, gen-0 threshold 50,000), ``sop-nospans`` (OpenTelemetry's
tracer swapped for one that makes no span), ``sop-256`` (``SOP_WORKER_SLOTS=256
SOP_ECHO_SLOTS=256``, the loop's batch size) and ``sop-loopwrite`` (an instant task's first
attempt written by the loop's four commands inside ``BEGIN_MANY``: no checks, three record
fields; it prices the guarded write against the rest of the worker and is never a setting).

``--trips`` adds an in-process run of the sop-llm worker (``ops.app.serve``) with a
counting hook on ``redis.asyncio`` connections *of this process only*: network round trips and
commands per task, by kind, at full load and at serial load. ``--profile DIR`` adds a py-spy
profile of the worker process at full load (``--profile-native`` to include C frames).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
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

from bench.redisutil import start_private_redis  # noqa: E402
from streams.keys import Keys  # noqa: E402

PROMPT_WORDS = (
    "the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing matches "
    "between sphinxes of black quartz and a jovial band of lumberjacks packs my box with five "
    "dozen liquor jugs before the lazy dog wakes up and the fox runs home through the forest past "
    "the river where the mist hangs low over the water and the heron waits for fish at dawn while "
    "the village sleeps and the baker lights his oven for the morning bread that feeds everyone"
)
POLL_S = 0.005
SYSTEMS = ("sop", "loop", "sop-gc", "sop-nospans", "sop-256", "sop-loopwrite")
# what-if: the production CLI, started after freezing the import-time heap out of the cyclic GC
# and raising the gen-0 threshold (700 by default) so a 64-task batch does not trigger it
SOP_GC_BOOT = (
    "import gc, sys\n"
    "from ops.cli import main\n"
    "gc.collect(); gc.freeze(); gc.set_threshold(50_000, 50, 100)\n"
    "sys.exit(main(['worker']))\n"
)
# what-if: the production CLI with OpenTelemetry's tracer replaced by one that makes no span
# and touches no context (what a "tracing off" fast path would cost nothing for)
SOP_NOSPANS_BOOT = (
    "import contextlib, sys\n"
    "from opentelemetry import trace\n"
    "class _Tracer:\n"
    "    @contextlib.contextmanager\n"
    "    def start_as_current_span(self, *a, **k):\n"
    "        yield trace.INVALID_SPAN\n"
    "    def start_span(self, *a, **k):\n"
    "        return trace.INVALID_SPAN\n"
    "trace.get_tracer = lambda *a, **k: _Tracer()\n"
    "from ops.cli import main\n"
    "sys.exit(main(['worker']))\n"
)
# what-if: BEGIN_MANY with an instant entry's first write cut to the loop's (HSET state, result
# and finished_at, EXPIRE, XADD, XACK; no HMGET checks, no idempotency, no full record): the same
# worker, script call and arguments, only the guarded write's Redis work taken out. Patched in
# the worker's process before it loads the script; it stops if BEGIN_MANY no longer matches.
_LOOPWRITE_AT = "  local e, id = ARGV[i + 3], ARGV[i + 4]\n"
_LOOPWRITE_LUA = """  if ARGV[i + 11] == '1' then
    local f = i + BEGIN_WIDTH
    redis.call('HSET', status, 'state', ARGV[f + 6], 'result', ARGV[f + 8],
      'finished_at', ARGV[f + 9])
    redis.call('EXPIRE', status, ttl)
    redis.call('XADD', KEYS[1], '*', 'type', ARGV[f + 7], 'data', ARGV[f + 8])
    redis.call('XACK', source, group, e)
    return {'finished', 1}
  end
"""
LOOPWRITE_PATCH = (
    "import hashlib, sys\n"
    "from streams import outcome_scripts as _o\n"
    f"_at, _cut = {_LOOPWRITE_AT!r}, {_LOOPWRITE_LUA!r}\n"
    "_cut = _cut.replace('BEGIN_WIDTH', str(_o.BEGIN_WIDTH))\n"
    "_s = _o.BEGIN_MANY_SCRIPT\n"
    "if _s.source.count(_at) != 1:\n"
    "    sys.exit('BEGIN_MANY changed: update LOOPWRITE_PATCH in bench/pipeline.py')\n"
    "_s.source = _s.source.replace(_at, _at + _cut)\n"
    "_s.sha = hashlib.sha1(_s.source.encode()).hexdigest()\n"
)
SOP_LOOPWRITE_BOOT = LOOPWRITE_PATCH + "from ops.cli import main\nsys.exit(main(['worker']))\n"


# --------------------------------------------------------------------------------------------
# helpers


def task_data(task_id: str) -> str:
    return json.dumps(
        {"v": 1, "task_id": task_id, "model": "echo", "prompt": PROMPT_WORDS, "max_tokens": 16},
        separators=(",", ":"),
    )


def task_fields(task_id: str) -> dict[str, str]:
    return {"type": "task.submitted", "data": task_data(task_id)}


def entry_ms(entry_id: bytes | str) -> int:
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(raw.split("-", 1)[0])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def code_fingerprint() -> str:
    """Short digest of the production sources under test (they change between commits)."""
    h = hashlib.sha256()
    for pkg in ("schemas", "streams", "providers", "gpu", "handlers", "ops"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def redis_cpu(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def commandstats(r: redis.Redis) -> dict[str, tuple[int, int]]:
    """``{command: (calls, usec)}`` from INFO commandstats (Lua-internal calls included)."""
    stats = r.info("commandstats")
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in stats.items()}


def stats_delta(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], ours: dict[str, int]
) -> dict[str, tuple[int, int]]:
    """Commands the consumer caused: the server's delta minus what this script sent itself."""
    out = {}
    for name, (calls, usec) in after.items():
        c0, u0 = before.get(name, (0, 0))
        calls, usec = calls - c0 - ours.get(name, 0), usec - u0
        if calls > 0 and name != "info":
            out[name] = (calls, usec)
    return out


def per_task(delta: dict[str, tuple[int, int]], n: int, usec: bool = False) -> dict[str, float]:
    return {k: round((u if usec else c) / n, 3) for k, (c, u) in sorted(delta.items())}


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
            pipe.xadd(stream, task_fields(f"{prefix}.{i}"))
        pipe.execute()


def wait_results(
    r: redis.Redis,
    keys: Keys,
    n: int,
    timeout: float,
    on_poll: Callable[[int], None] | None = None,
) -> int:
    """Poll XLEN of the results stream until it holds ``n`` entries; returns the XLEN count."""
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
    """Start one consumer; ``sop@PATH``: the sop-llm worker of another checkout (a ``git
    worktree`` of an earlier commit, say), run from that tree, for A/B runs."""
    cwd = ROOT
    if system == "loop":
        env = dict(os.environ)
        script = str(ROOT / "bench" / "baseline_loop.py")
        cmd = [sys.executable, script, "--redis-url", url, "--namespace", ns]
    else:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOP_")}
        env.update(SOP_REDIS_URL=url, SOP_NAMESPACE=ns, SOP_LOG_LEVEL="WARNING")
        cmd = [sys.executable, "-m", "ops.cli", "worker"]
        if system == "sop-gc":
            cmd = [sys.executable, "-c", SOP_GC_BOOT]
        elif system == "sop-nospans":
            cmd = [sys.executable, "-c", SOP_NOSPANS_BOOT]
        elif system == "sop-loopwrite":
            cmd = [sys.executable, "-c", SOP_LOOPWRITE_BOOT]
        elif system == "sop-256":
            env.update(SOP_WORKER_SLOTS="256", SOP_ECHO_SLOTS="256")
        elif system.startswith("sop@"):
            cwd = Path(system.removeprefix("sop@")).resolve()
            env["PYTHONPATH"] = str(cwd)  # that tree's packages, not the installed ones
    with log.open("ab") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def known_system(name: str) -> bool:
    """One of :data:`SYSTEMS`, or ``sop@PATH`` where PATH is a checkout of this project."""
    if name.startswith("sop@"):
        return (Path(name.removeprefix("sop@")) / "ops" / "cli.py").is_file()
    return name in SYSTEMS


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
    first_ms = entry_ms(r.xrange(keys.results, count=1)[0][0])
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


def publish_and_wait(
    r: redis.Redis, keys: Keys, task_id: str, last: bytes
) -> tuple[float, bytes, int]:
    """Publish one task (plain XADD) and block on the results stream, read from ``last`` on,
    until its result: (seconds, the newest results id seen, XREADs made)."""
    needle = f'"task_id":"{task_id}"'.encode()
    fields = task_fields(task_id)
    t0 = time.perf_counter()
    r.xadd(keys.tasks("default", "normal"), fields)  # type: ignore[arg-type]
    reads = 0
    while True:
        reply: Any = r.xread({keys.results: last}, count=16, block=5000)
        reads += 1
        if not reply:
            raise TimeoutError(f"no result for {task_id} within 5 s")
        done = False
        for eid, entry in reply[0][1]:
            last = eid
            done = done or needle in entry[b"data"]
        if done:
            return time.perf_counter() - t0, last, reads


def serial_latency(
    r: redis.Redis, keys: Keys, n: int, warmup: int, tag: str = "s"
) -> dict[str, Any]:
    """One task at a time: XADD, then blocking XREAD on the results stream until its result."""
    stats0 = commandstats(r)
    last = last_result_id(r, keys)
    ours = {"xadd": warmup + n, "xread": 0, "xrevrange": 1}
    lat: list[float] = []
    for i in range(warmup + n):
        seconds, last, reads = publish_and_wait(r, keys, f"{keys.namespace}.{tag}{i}", last)
        ours["xread"] += reads
        if i >= warmup:
            lat.append(seconds * 1000)
    delta = stats_delta(stats0, commandstats(r), ours)
    return {
        "n": n,
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "max_ms": max(lat),
        "redis_cmds_per_task": per_task(delta, warmup + n),
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
                reply = read_r.xread({keys.results: last}, count=512, block=10_000)
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
    log = logdir / f"{keys.namespace}-{system}.log"
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
    """Counts writes to Redis (one request, or one pipeline = one network round trip)."""

    def __init__(self) -> None:
        import importlib
        import pkgutil

        # name every Lua script the packages define (objects with a 40-hex ``sha`` and a name)
        self.names: dict[bytes, str] = {}
        for pkg in ("streams", "handlers", "gpu"):
            for info in pkgutil.iter_modules([str(ROOT / pkg)]):
                try:
                    module = importlib.import_module(f"{pkg}.{info.name}")
                except ImportError:  # an optional dependency is missing: no scripts from it
                    continue
                for obj in vars(module).values():
                    sha, name = getattr(obj, "sha", None), getattr(obj, "name", None)
                    if isinstance(sha, str) and len(sha) == 40 and isinstance(name, str):
                        self.names[sha.encode()] = name.upper()
        self.lock = threading.Lock()
        self.trips: collections.Counter[str] = collections.Counter()
        self.cmds: collections.Counter[str] = collections.Counter()

    def reset(self) -> None:
        with self.lock:
            self.trips.clear()
            self.cmds.clear()

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        with self.lock:
            return dict(self.trips), dict(self.cmds)

    def record(self, command: bytes | str | Iterable[bytes]) -> None:
        if isinstance(command, str):
            command = command.encode()
        buf = command if isinstance(command, bytes) else b"".join(command)
        kinds = [
            f"EVALSHA {self.names.get(arg, '?')}" if name == "EVALSHA" else name
            for name, arg in _parse_request(buf)
        ]
        kind = kinds[0] if len(set(kinds)) == 1 else "mixed"
        if len(kinds) > 1:
            kind += " (pipeline)"
        with self.lock:
            self.trips[kind] += 1
            self.cmds[kind] += len(kinds)

    def install(self) -> None:
        from redis.asyncio.connection import AbstractConnection

        original = AbstractConnection.send_packed_command
        counter = self

        async def counted(self: Any, command: Any, check_health: bool = True) -> None:
            counter.record(command)
            await original(self, command, check_health)

        AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]

        # the worker's own links (streams/link.py): each command is its own request
        import hiredis

        from streams.link import _Wire

        wire_send = _Wire.send

        def counted_wire(self: Any, args: tuple[Any, ...]) -> Any:
            counter.record(hiredis.pack_command(args))
            return wire_send(self, args)

        _Wire.send = counted_wire  # type: ignore[method-assign]


def count_round_trips(args: argparse.Namespace, r: redis.Redis) -> dict[str, Any]:
    """Run the production worker (``ops.app.serve``, as ``sop-llm worker`` does) in a thread of
    this process, with ``TripCounter`` installed on the redis.asyncio connections (this process
    only): full load, then serial load."""
    from ops import logs
    from ops.app import serve
    from ops.settings import Settings

    counter = TripCounter()
    counter.install()
    keys = Keys(f"bench-{uuid.uuid4().hex[:12]}")
    settings = Settings(redis_url=args.redis_url, namespace=keys.namespace, log_level="WARNING")
    logs.configure("WARNING", "json")
    state: dict[str, Any] = {}
    started = threading.Event()

    async def run_worker() -> None:
        stop = asyncio.Event()
        state.update(loop=asyncio.get_running_loop(), stop=stop)
        started.set()
        await serve(settings, stop, worker=True, sidecar=False)

    def thread_main() -> None:
        try:
            import uvloop
        except ImportError:
            asyncio.run(run_worker())
        else:
            uvloop.run(run_worker())

    n, m = args.trips_tasks, args.trips_serial
    out: dict[str, Any] = {"namespace": keys.namespace}
    th = threading.Thread(target=thread_main, daemon=True)
    try:
        publish_backlog(r, keys, n, keys.namespace)
        stats0 = commandstats(r)
        th.start()
        started.wait(30)
        polls = wait_results(r, keys, n, timeout=300)
        delta = stats_delta(stats0, commandstats(r), {"xlen": polls})
        out["full"] = _trip_report(n, *counter.snapshot(), delta)

        serial_latency(r, keys, 20, warmup=0, tag="w")  # the worker is idle and blocked again
        counter.reset()
        t0 = time.perf_counter()
        se = serial_latency(r, keys, m, warmup=0, tag="s")
        elapsed = time.perf_counter() - t0
        out["serial"] = _trip_report(m, *counter.snapshot(), {})
        out["serial"]["redis_cmds_per_task"] = se["redis_cmds_per_task"]
        out["serial"]["seconds"] = elapsed
    finally:
        if "loop" in state:
            state["loop"].call_soon_threadsafe(state["stop"].set)
            th.join(timeout=30)
        cleanup(r, keys)
    return out


def _trip_report(
    n: int, trips: dict[str, int], cmds: dict[str, int], delta: dict[str, tuple[int, int]]
) -> dict[str, Any]:
    return {
        "tasks": n,
        "round_trips_per_task": sum(trips.values()) / n,
        "client_cmds_per_task": sum(cmds.values()) / n,
        "round_trips": dict(sorted(trips.items(), key=lambda kv: -kv[1])),
        "client_cmds": dict(sorted(cmds.items(), key=lambda kv: -kv[1])),
        "redis_cmds_per_task": per_task(delta, n),
    }


# --------------------------------------------------------------------------------------------
# profile: py-spy on the worker process at full load


def profile(args: argparse.Namespace, r: redis.Redis, outdir: Path) -> dict[str, Any]:
    outdir.mkdir(parents=True, exist_ok=True)
    pyspy = Path(sys.executable).with_name("py-spy")
    keys = Keys(f"bench-{uuid.uuid4().hex[:12]}")
    raw = outdir / ("pyspy-worker-native.txt" if args.profile_native else "pyspy-worker.txt")
    proc = spawn("sop", args.redis_url, keys.namespace, outdir / "worker.log")
    spy = None
    try:
        # attach once the worker is up and idle, so start-up does not enter the profile
        deadline = time.monotonic() + 30
        while not any(True for _ in r.scan_iter(match=keys.worker("*"), count=100)):
            if time.monotonic() > deadline:
                raise TimeoutError("worker did not start")
            time.sleep(0.05)
        cmd = [str(pyspy), "record", "--pid", str(proc.pid), "--rate", "500", "--format", "raw"]
        cmd += ["--output", str(raw), *(["--native"] if args.profile_native else [])]
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        t0 = time.perf_counter()
        publish_backlog(r, keys, args.profile_tasks, keys.namespace)
        wait_results(r, keys, args.profile_tasks, timeout=300)
        rate = args.profile_tasks / (time.perf_counter() - t0)
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=30)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        terminate(proc)
        cleanup(r, keys)
    out = summarise_profile(raw)
    out["tasks_per_s_while_sampled"] = rate
    return out


def summarise_profile(raw: Path, top: int = 30) -> dict[str, Any]:
    """Self and inclusive shares per function (lines of one function merged)."""
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
    """``func (path/to/file.py:123)`` → ``func (file.py)``, so the lines of a function merge."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "python3.11/", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


# --------------------------------------------------------------------------------------------
# report


Agg = tuple[float, float, float]


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
        out[f"rate_{rate:.0f}_p50_ms"] = agg(lambda x, k=k: x["rates"][k]["p50_ms"])
        out[f"rate_{rate:.0f}_p99_ms"] = agg(lambda x, k=k: x["rates"][k]["p99_ms"])
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
    ap.add_argument("--systems", default="sop,loop", help=f"in this order each round: {SYSTEMS}")
    ap.add_argument("--serial", type=int, default=2000, help="serial-latency tasks (0: skip)")
    ap.add_argument("--rate", type=float, nargs="*", default=[1000.0, 4000.0], help="tasks/s")
    ap.add_argument("--rate-tasks", type=int, default=3000, help="tasks per rate run (0: skip)")
    ap.add_argument("--trips", action="store_true", help="count round trips (in-process worker)")
    ap.add_argument("--trips-tasks", type=int, default=20_000)
    ap.add_argument("--trips-serial", type=int, default=1000)
    ap.add_argument("--profile", type=Path, metavar="DIR", help="py-spy the worker at full load")
    ap.add_argument("--profile-native", action="store_true", help="include C frames")
    ap.add_argument("--profile-tasks", type=int, default=40_000)
    ap.add_argument("--json", type=Path, help="write every measurement here")
    ap.add_argument(
        "--private-redis", action="store_true", help="start a throw-away redis-server for the run"
    )
    args = ap.parse_args()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := set(systems) - set(SYSTEMS):
        ap.error(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")

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
    import hiredis
    import pydantic
    import uvloop

    env = {
        "python": platform.python_version(),
        "redis_server": r.info("server")["redis_version"],
        "redis_py": redis.__version__,
        "hiredis": hiredis.__version__,
        "pydantic": pydantic.VERSION,
        "uvloop": uvloop.__version__,
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
    if args.trips:
        report["trips"] = count_round_trips(args, r)
        for mode in ("full", "serial"):
            t = report["trips"][mode]
            print(
                f"sop round trips/task, {mode} load: {t['round_trips_per_task']:.4f}"
                f" (client commands/task {t['client_cmds_per_task']:.4f}) over {t['tasks']} tasks"
            )
            print(f"  round trips by kind: {json.dumps(t['round_trips'])}")
            print(f"  commands by kind:    {json.dumps(t['client_cmds'])}")
            print(f"  redis commands/task: {json.dumps(t['redis_cmds_per_task'])}")
    if args.profile:
        report["profile"] = prof = profile(args, r, args.profile)
        print(
            f"profile: {prof['samples']} samples at"
            f" {prof['tasks_per_s_while_sampled']:.0f} tasks/s (py-spy slows the worker)"
        )
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
