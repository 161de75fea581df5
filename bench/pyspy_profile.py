"""A py-spy profile of the sop-llm worker process at full load (its own process, as in
production), summarised per function: self and inclusive shares of the samples."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.consumers import spawn  # noqa: E402
from bench.sampling import terminate  # noqa: E402
from bench.sop_driver import cleanup, publish_backlog, wait_results  # noqa: E402
from sop_llm.streams.keys import Keys  # noqa: E402

PYSPY = Path(sys.executable).with_name("py-spy")  # not a dependency: pip install py-spy


def profile(
    url: str, r: redis.Redis, outdir: Path, tasks: int, native: bool = False
) -> dict[str, Any]:
    """py-spy (``--rate 500``, raw format) on a ``sop`` worker while it drains ``tasks``."""
    outdir.mkdir(parents=True, exist_ok=True)
    keys = Keys(f"bench-{uuid.uuid4().hex[:12]}")
    raw = outdir / ("pyspy-worker-native.txt" if native else "pyspy-worker.txt")
    proc = spawn("sop", url, keys.namespace, outdir / "worker.log")
    spy = None
    try:
        # attach once the worker has answered a first task, so start-up is not in the profile
        publish_backlog(r, keys, 1, f"{keys.namespace}.warm")
        wait_results(r, keys, 1, timeout=30)
        cmd = [str(PYSPY), "record", "--pid", str(proc.pid), "--rate", "500", "--format", "raw"]
        cmd += ["--output", str(raw), *(["--native"] if native else [])]
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        t0 = time.perf_counter()
        publish_backlog(r, keys, tasks, keys.namespace)
        wait_results(r, keys, tasks + 1, timeout=300)
        rate = tasks / (time.perf_counter() - t0)
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


def print_profile(prof: dict[str, Any]) -> None:
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
