"""How the harnesses start a consumer, each its own process: ``sop`` (``python -m sop_llm.ops.cli
worker``, defaults, every guarantee on), ``sop-256`` (the same with ``SOP_WORKER_SLOTS=256
SOP_ECHO_SLOTS=256``, the loop's batch size), ``loop`` (``bench/baseline_loop.py``) and
``sop@PATH`` (the worker of another checkout, for A/B runs). sop-llm is configured through its
``SOP_*`` environment only. Standard library only: the peers' venv imports it too."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SYSTEMS = ("sop", "sop-256", "loop")


def known_system(name: str) -> bool:
    """One of :data:`SYSTEMS`, or ``sop@PATH`` where PATH is a checkout of this project."""
    if name.startswith("sop@"):
        ops = Path(name.removeprefix("sop@")) / "ops"
        return (ops / "cli.py").is_file() or (ops / "cli" / "__main__.py").is_file()
    return name in SYSTEMS


def spawn(
    system: str,
    url: str,
    ns: str,
    log: Path,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start one consumer of namespace ``ns`` with ``python`` (the project venv's interpreter),
    its output appended to ``log``; ``env`` adds variables (more ``SOP_*`` settings: a models
    file, say). ``sop@PATH`` runs from that tree (a ``git worktree`` of an earlier commit)."""
    cwd = ROOT
    if system == "loop":
        full = dict(os.environ)
        script = str(ROOT / "bench" / "baseline_loop.py")
        cmd = [python, script, "--redis-url", url, "--namespace", ns]
    else:
        full = {k: v for k, v in os.environ.items() if not k.startswith("SOP_")}
        full.update(SOP_REDIS_URL=url, SOP_NAMESPACE=ns, SOP_LOG_LEVEL="WARNING")
        cmd = [python, "-m", "sop_llm.ops.cli", "worker"]
        if system == "sop-256":
            full.update(SOP_WORKER_SLOTS="256", SOP_ECHO_SLOTS="256")
        elif system.startswith("sop@"):
            cwd = Path(system.removeprefix("sop@")).resolve()
            full["PYTHONPATH"] = str(cwd)  # that tree's packages, not the installed ones
    full.update(env or {})
    with log.open("ab") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=full, stdout=out, stderr=subprocess.STDOUT)
