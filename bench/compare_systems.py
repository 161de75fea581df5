"""The systems ``bench/compare.py`` runs, and how the harness drives each: start its consumers,
publish with its own client, count its results. sop-llm and the loop run from the project's venv;
each peer is one module under ``bench/peers/``, imported here in the peers' venv."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import redis
import redis.asyncio as aredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import consumers  # noqa: E402
from bench.peers.common import payload  # noqa: E402

PROJECT_PY = str(ROOT / ".venv" / "bin" / "python")
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
    """Plain XADDs of ``task.submitted`` entries, as ``bench/sop_driver.py`` publishes them."""

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


def _on_namespace(
    name: str, ns: str, config: str, spawn: Callable[[str, Path], list[subprocess.Popen[bytes]]]
) -> System:
    """A consumer of sop-llm's wire format in namespace ``ns``: tasks go in by plain XADD, and
    each result is an entry on the namespace's results stream."""
    keys = Keys(ns)
    return System(
        name=name,
        config=config,
        spawn=spawn,
        publisher=lambda url: SopPublisher(url, keys.tasks("default", "normal")),
        results_stream=keys.results,
        notify=keys.results,
        id_prefix=f"{ns}.",
    )


def project_system(name: str, consumer: str, procs: int, ns: str, config: str) -> System:
    """``procs`` processes of one of ``bench/consumers.py``'s consumers, in the project venv."""

    def spawn(url: str, log: Path) -> list[subprocess.Popen[bytes]]:
        return [consumers.spawn(consumer, url, ns, log, python=PROJECT_PY) for _ in range(procs)]

    return _on_namespace(name, ns, config, spawn)


SOP = "`python -m sop_llm.ops.cli worker`, {}, every guarantee on"
PROJECT_SYSTEMS = {  # name: (consumer of bench/consumers.py, processes, configuration)
    "sop": ("sop", 1, "1 x " + SOP.format("defaults (64 slots)")),
    "sop-256": ("sop-256", 1, "1 x " + SOP.format("SOP_WORKER_SLOTS=256 (256 slots)")),
    "sop-2": ("sop", 2, "2 x " + SOP.format("defaults (64 slots)")),
    "loop": ("loop", 1, "bench/baseline_loop.py: XREADGROUP COUNT 256, one pipeline per batch"),
}


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


def make_system(name: str) -> System:
    """A fresh instance of one of :data:`SYSTEMS` (sop-llm and the loop in a new namespace)."""
    if name in PROJECT_SYSTEMS:
        consumer, procs, config = PROJECT_SYSTEMS[name]
        return project_system(name, consumer, procs, f"bench-{uuid.uuid4().hex[:12]}", config)
    return peer_system(name)
