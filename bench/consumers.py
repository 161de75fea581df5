"""The consumers the sop-vs-loop harnesses start, each its own process: ``sop`` (``python -m
ops.cli worker``, defaults, every guarantee on), ``loop`` (``bench/baseline_loop.py``), the
what-ifs below (they change no production code; each is started with its patch applied in the
worker's process) and ``sop@PATH`` (the worker of another checkout, for A/B runs).

What-ifs: ``sop-gc`` (the same worker started after ``gc.freeze()``, gen-0 threshold 50,000),
``sop-nospans`` (OpenTelemetry's tracer swapped for one that makes no span), ``sop-256``
(``SOP_WORKER_SLOTS=256 SOP_ECHO_SLOTS=256``, the loop's batch size) and ``sop-loopwrite`` (an
instant task's first attempt written by the loop's four commands inside ``BEGIN_MANY``: no
checks, three record fields; it prices the guarded write against the rest of the worker and is
never a setting) and ``sop-yield`` (the worker calls ``sched_yield`` before handling each reply
from Redis: it tests whether, on one CPU, the worker's reply handling holds up the harness).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SYSTEMS = ("sop", "loop", "sop-gc", "sop-nospans", "sop-256", "sop-loopwrite", "sop-yield")
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
    "    sys.exit('BEGIN_MANY changed: update LOOPWRITE_PATCH in bench/consumers.py')\n"
    "_s.source = _s.source.replace(_at, _at + _cut)\n"
    "_s.sha = hashlib.sha1(_s.source.encode()).hexdigest()\n"
)
# what-if: the worker gives up its CPU (sched_yield) each time Redis bytes reach one of its
# links, before handling them: on one CPU, whatever else Redis's answer woke (the harness
# reading the result) runs first. It tests where the pinned serial gap comes from.
SOP_YIELD_BOOT = (
    "import os, sys\n"
    "from streams import link as _l\n"
    "_received = _l._Wire.data_received\n"
    "def _yield_first(self, data):\n"
    "    os.sched_yield()\n"
    "    _received(self, data)\n"
    "_l._Wire.data_received = _yield_first\n"
    "from ops.cli import main\n"
    "sys.exit(main(['worker']))\n"
)
SOP_LOOPWRITE_BOOT = LOOPWRITE_PATCH + "from ops.cli import main\nsys.exit(main(['worker']))\n"


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
        elif system == "sop-yield":
            cmd = [sys.executable, "-c", SOP_YIELD_BOOT]
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
