"""Where serial latency goes: the consumer's own critical path, and Redis's, for sop and the loop.

    .venv/bin/python bench/critpath.py --tasks 3000 --rounds 2

One task at a time (as ``bench/pipeline.py``'s serial phase). Each consumer runs in its own
process with a hook installed at start-up that times, per task, from the moment the bytes of the
blocking read's reply arrive to the moment its write goes out:

* sop-llm: ``streams/link.py``'s ``_Wire.data_received`` (reply of ``XREADGROUP``) to
  ``_Wire.send`` of the next ``EVALSHA`` (``BEGIN_MANY``);
* the loop: ``socket.recv_into`` after an ``XREADGROUP`` was sent, to the ``sendall`` of its
  pipeline.

Redis's side comes from ``INFO commandstats`` (µs per task per command; ``xadd`` and ``xread``
include the publisher's own, and commands run inside a script count both on their own line and
in ``evalsha``). Prints p50/p10 of each critical path, the serial p50 publish-to-result, and the
Redis µs per task.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pipeline as P

from streams.keys import Keys

ROOT = Path(__file__).resolve().parent.parent

_REPORT = """
def _report(rec, tag):
    import sys
    rec.sort()
    if rec:
        p50, p10 = rec[len(rec) // 2], rec[len(rec) // 10]
        print(f"CRIT {tag} {p50:.1f} {p10:.1f} {len(rec)}", file=sys.stderr, flush=True)
"""

SOP_BOOT = (
    _REPORT
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
        rec.append((time.perf_counter() - state["t"]) * 1e6)
        state["t"] = None
    return send(self, args)
L._Wire.data_received, L._Wire.send = hooked_data, hooked_send
atexit.register(_report, rec, "sop")
sys.argv = ["sop-llm", "worker"]
from ops.cli import main
main()
"""
)

LOOP_BOOT = (
    _REPORT
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
        rec.append((time.perf_counter() - state["t"]) * 1e6)
        state["t"] = None
    return sendall(self, data, *a)
socket.socket.recv_into, socket.socket.sendall = hooked_recv, hooked_sendall
atexit.register(_report, rec, "loop")
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""
)


def run_one(system: str, url: str, n: int, log: Path) -> dict[str, float]:
    r = redis.Redis.from_url(url)
    keys = Keys(f"bench-{uuid.uuid4().hex[:12]}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOP_")}
    env.update(SOP_REDIS_URL=url, SOP_NAMESPACE=keys.namespace, SOP_LOG_LEVEL="WARNING")
    env["PYTHONPATH"] = str(ROOT)
    if system == "sop":
        cmd = [sys.executable, "-c", SOP_BOOT]
    else:
        script = str(ROOT / "bench" / "baseline_loop.py")
        cmd = [sys.executable, "-c", LOOP_BOOT, script, "--redis-url", url]
        cmd += ["--namespace", keys.namespace]
    err = log.open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        time.sleep(3.0)  # start-up
        stats0 = P.commandstats(r)
        serial = P.serial_latency(r, keys, n, warmup=200)
        delta = P.stats_delta(stats0, P.commandstats(r), {"xadd": n + 200, "xread": 0})
    finally:
        P.terminate(proc)
        err.close()
        P.cleanup(r, keys)
    crit = [line.split() for line in log.read_text().splitlines() if line.startswith("CRIT ")]
    usec = P.per_task(delta, n + 200, usec=True)
    return {
        "crit_p50_us": float(crit[-1][2]) if crit else float("nan"),
        "crit_p10_us": float(crit[-1][3]) if crit else float("nan"),
        "serial_p50_ms": serial["p50_ms"],
        **{f"redis_{k}": v for k, v in usec.items() if v >= 0.05},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--tasks", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"sop-critpath-{os.getpid()}.log"
    for rnd in range(1, args.rounds + 1):
        for system in ("sop", "loop"):
            out = run_one(system, args.redis_url, args.tasks, log)
            shown = " ".join(f"{k}={v:.2f}" for k, v in out.items())
            print(f"round {rnd} {system:4s} {shown}", flush=True)
    log.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
