"""What the harnesses sample around a run: percentiles, process and machine CPU, Redis CPU and
``INFO commandstats`` deltas, and stopping consumers. Only the standard library and redis-py:
importable from the project's venv and from the peers' venv alike."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import redis


def pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def entry_ms(entry_id: bytes | str) -> int:
    """The millisecond part of a stream entry id: the Redis clock when it was added."""
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(raw.split("-", 1)[0])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(procs: list[subprocess.Popen[bytes]]) -> float:
    """CPU seconds of the consumer processes and their direct children (taskiq forks one); a
    process that has already gone counts nothing."""
    pids = [p.pid for p in procs]
    for p in procs:
        try:
            kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
        except FileNotFoundError:
            kids = []
        pids += [int(k) for k in kids]
    total = 0.0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            total += cpu_seconds(pid)
    return total


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
    """Commands the consumer caused: the server's delta minus what the harness sent itself
    (``ours``: calls by command; ``info`` is always the harness's)."""
    out = {}
    for name, (calls, usec) in after.items():
        c0, u0 = before.get(name, (0, 0))
        calls, usec = calls - c0 - ours.get(name, 0), usec - u0
        if calls > 0 and name != "info":
            out[name] = (calls, usec)
    return out


def per_task(delta: dict[str, tuple[int, int]], n: int, usec: bool = False) -> dict[str, float]:
    """Calls (or µs of Redis time) per task, by command."""
    return {k: round((u if usec else c) / n, 3) for k, (c, u) in sorted(delta.items())}


def terminate(*procs: subprocess.Popen[bytes]) -> None:
    """SIGTERM every consumer, then wait up to 20 s each (SIGKILL after that)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@contextlib.contextmanager
def stopping(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """``proc``, terminated on the way out (:func:`terminate`)."""
    try:
        yield proc
    finally:
        terminate(proc)
