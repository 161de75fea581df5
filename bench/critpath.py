"""Where serial latency goes, on one clock: harness, consumer and Redis, for sop and the loop.

    .venv/bin/python bench/critpath.py --tasks 3000 --rounds 2

One task at a time (as ``bench/pipeline.py``'s serial phase). Each consumer runs in its own
process with a hook installed at start-up that stamps ``perf_counter()`` (CLOCK_MONOTONIC, the
same clock in every process), per task, when the bytes of its blocking read's reply arrive, when
its write starts and when the write has left the socket:

* sop-llm: ``streams/link.py``'s ``_Wire.data_received`` (reply of ``XREADGROUP``), then
  ``_Wire.send`` of the next ``EVALSHA`` (``BEGIN_MANY``): its start, and its return (the
  command packed and written);
* the loop: ``socket.recv_into`` after an ``XREADGROUP`` was sent, then the ``sendall`` of its
  pipeline (packed before: its packing counts in its critical path).

With the harness's own stamps (before the publishing XADD, after the result was read) each task
splits into: publish to the consumer's read reply (``pub_to_read_us``), the consumer's critical
path (``crit_us``), its write (``write_us``), and the write's end to the harness holding the
result (``written_to_result_us``: Redis running the write, then the harness waking). p50 of each.
Redis's side comes from ``INFO commandstats`` (µs per task per command; ``xadd`` and ``xread``
include the publisher's own, and commands run inside a script count both on their own line and
in ``evalsha``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import consumers, sampling, sop_driver
from streams.keys import Keys

ROOT = Path(__file__).resolve().parent.parent

# Each consumer stamps, per task, perf_counter() (CLOCK_MONOTONIC: one clock for every process
# on the machine) when its read's reply arrives, when its write starts and when the write has left
# the socket; at exit it writes the stamps as JSON to $CRIT_OUT.
_DUMP = """
def _dump(rec):
    import json, os
    with open(os.environ["CRIT_OUT"], "w") as f:
        json.dump(rec, f)
"""

SOP_BOOT = (
    _DUMP
    + """
import atexit, sys, time
import streams.link as L
rec, state = [], {"t": None}
data_received, send = L._Wire.data_received, L._Wire.send
def hooked_data(self, data):
    if getattr(self, "_last", None) == "XREADGROUP":
        state["t"] = time.perf_counter()
    data_received(self, data)
def hooked_send(self, args):
    self._last = args[0]
    if args[0] == "EVALSHA" and state["t"] is not None:
        t1 = time.perf_counter()
        out = send(self, args)
        rec.append((state["t"], t1, time.perf_counter()))
        state["t"] = None
        return out
    return send(self, args)
L._Wire.data_received, L._Wire.send = hooked_data, hooked_send
atexit.register(_dump, rec)
sys.argv = ["sop-llm", "worker"]
from ops.cli import main
main()
"""
)

LOOP_BOOT = (
    _DUMP
    + """
import atexit, runpy, socket, sys, time
rec, state = [], {"t": None, "read": False}
recv_into, sendall = socket.socket.recv_into, socket.socket.sendall
def hooked_recv(self, *a, **k):
    n = recv_into(self, *a, **k)
    if state["read"]:
        state["t"], state["read"] = time.perf_counter(), False
    return n
def hooked_sendall(self, data, *a):
    if b"XREADGROUP" in bytes(data)[:64]:
        state["read"] = True
    elif state["t"] is not None:
        t1 = time.perf_counter()
        out = sendall(self, data, *a)
        rec.append((state["t"], t1, time.perf_counter()))
        state["t"] = None
        return out
    return sendall(self, data, *a)
socket.socket.recv_into, socket.socket.sendall = hooked_recv, hooked_sendall
atexit.register(_dump, rec)
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""
)

SYSTEMS = ("sop", "loop", "sop-loopwrite")
SEGMENTS = ("pub_to_read_us", "crit_us", "write_us", "written_to_result_us")


def segments(tasks: list[tuple[float, float]], stamps: list[list[float]]) -> dict[str, list[float]]:
    """Per task, on the one clock: publish to the consumer's read reply, that reply to the start
    of its write (the critical path), the write itself (packing and the socket call), and the
    write's end to the harness holding the result. ``tasks``: (publish, result) per task;
    ``stamps``: the consumer's (read, write start, write end), matched by time."""
    out: dict[str, list[float]] = {k: [] for k in SEGMENTS}
    j = 0
    for t0, t_end in tasks:
        while j < len(stamps) and stamps[j][0] < t0:
            j += 1
        if j == len(stamps) or stamps[j][2] > t_end:
            continue  # no read of this task between its publish and its result: not counted
        read, write, written = stamps[j]
        out["pub_to_read_us"].append((read - t0) * 1e6)
        out["crit_us"].append((write - read) * 1e6)
        out["write_us"].append((written - write) * 1e6)
        out["written_to_result_us"].append((t_end - written) * 1e6)
    return out


def run_one(system: str, url: str, n: int, out: Path) -> dict[str, float]:
    r = redis.Redis.from_url(url)
    keys = Keys(f"bench-{uuid.uuid4().hex[:12]}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOP_")}
    env.update(SOP_REDIS_URL=url, SOP_NAMESPACE=keys.namespace, SOP_LOG_LEVEL="WARNING")
    env.update(PYTHONPATH=str(ROOT), CRIT_OUT=str(out))
    if system == "sop":
        cmd = [sys.executable, "-c", SOP_BOOT]
    elif system == "sop-loopwrite":
        cmd = [sys.executable, "-c", consumers.LOOPWRITE_PATCH + SOP_BOOT]
    else:
        script = str(ROOT / "bench" / "baseline_loop.py")
        cmd = [sys.executable, "-c", LOOP_BOOT, script, "--redis-url", url]
        cmd += ["--namespace", keys.namespace]
    out.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    warmup = 200
    tasks: list[tuple[float, float]] = []
    lat: list[float] = []
    try:
        time.sleep(3.0)  # start-up
        stats0 = sampling.commandstats(r)
        last = sop_driver.last_result_id(r, keys)
        for i in range(warmup + n):
            seconds, last, _ = sop_driver.publish_and_wait(r, keys, f"{keys.namespace}.c{i}", last)
            t_end = time.perf_counter()
            if i >= warmup:
                tasks.append((t_end - seconds, t_end))
                lat.append(seconds * 1000)
        delta = sampling.stats_delta(
            stats0, sampling.commandstats(r), {"xadd": n + warmup, "xread": 0}
        )
    finally:
        sampling.terminate(proc)
        sop_driver.cleanup(r, keys)
    seg = segments(tasks, json.loads(out.read_text()) if out.exists() else [])
    usec = sampling.per_task(delta, n + warmup, usec=True)
    shown: dict[str, float] = {
        "serial_p50_ms": sampling.pct(lat, 50),
        "matched": len(seg["crit_us"]),
    }
    for name, values in seg.items():
        shown[name] = sampling.pct(values, 50)
    shown["crit_p10_us"] = sampling.pct(seg["crit_us"], 10)
    shown.update({f"redis_{k}": v for k, v in usec.items() if v >= 0.05})
    return shown


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--tasks", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--systems",
        default="sop,loop",
        help=f"each round in order, from {SYSTEMS} (sop-loopwrite: see bench/consumers.py)",
    )
    args = ap.parse_args()
    systems = args.systems.split(",")
    if unknown := set(systems) - set(SYSTEMS):
        ap.error(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"sop-critpath-{os.getpid()}.json"
    for rnd in range(1, args.rounds + 1):
        for system in systems:
            got = run_one(system, args.redis_url, args.tasks, out)
            shown = " ".join(f"{k}={v:.3f}" if k.endswith("_ms") else f"{k}={v:.1f}"
                             for k, v in got.items())  # fmt: skip
            print(f"round {rnd} {system:13s} {shown}", flush=True)
    out.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
