"""Redis round trips per task, counted in this process: the production worker
(``ops.app.serve``) runs in a thread here with a hook on every redis.asyncio connection and on
the worker's own links (``streams/link.py``), of this process only. One request, or one
pipeline, is one network round trip; each is named by its command (``EVALSHA`` by the script's
name)."""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.sampling import commandstats, per_task, stats_delta  # noqa: E402
from bench.sop_driver import cleanup, publish_backlog, serial_latency, wait_results  # noqa: E402
from streams.keys import Keys  # noqa: E402


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


def count_round_trips(url: str, r: redis.Redis, n: int, m: int) -> dict[str, Any]:
    """Run the production worker (``ops.app.serve``, as ``sop-llm worker`` does) in a thread of
    this process, with ``TripCounter`` installed on the redis.asyncio connections (this process
    only): ``n`` tasks at full load, then ``m`` one at a time."""
    from ops import logs
    from ops.app import serve
    from ops.settings import Settings

    counter = TripCounter()
    counter.install()
    keys = Keys(f"bench-{uuid.uuid4().hex[:12]}")
    settings = Settings(redis_url=url, namespace=keys.namespace, log_level="WARNING")
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

    out: dict[str, Any] = {"namespace": keys.namespace}
    th = threading.Thread(target=thread_main, daemon=True)
    try:
        publish_backlog(r, keys, n, keys.namespace)
        stats0 = commandstats(r)
        th.start()
        started.wait(30)
        polls = wait_results(r, keys, n, timeout=300)
        delta = stats_delta(stats0, commandstats(r), {"xlen": polls})
        out["full"] = trip_report(n, *counter.snapshot(), delta)

        serial_latency(r, keys, 20, warmup=0, tag="w")  # the worker is idle and blocked again
        counter.reset()
        t0 = time.perf_counter()
        se = serial_latency(r, keys, m, warmup=0, tag="s")
        elapsed = time.perf_counter() - t0
        out["serial"] = trip_report(m, *counter.snapshot(), {})
        out["serial"]["redis_cmds_per_task"] = se["redis_cmds_per_task"]
        out["serial"]["seconds"] = elapsed
    finally:
        if "loop" in state:
            state["loop"].call_soon_threadsafe(state["stop"].set)
            th.join(timeout=30)
        cleanup(r, keys)
    return out


def trip_report(
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


def print_trips(trips: dict[str, Any]) -> None:
    for mode in ("full", "serial"):
        t = trips[mode]
        print(
            f"sop round trips/task, {mode} load: {t['round_trips_per_task']:.4f}"
            f" (client commands/task {t['client_cmds_per_task']:.4f}) over {t['tasks']} tasks"
        )
        print(f"  round trips by kind: {json.dumps(t['round_trips'])}")
        print(f"  commands by kind:    {json.dumps(t['client_cmds'])}")
        print(f"  redis commands/task: {json.dumps(t['redis_cmds_per_task'])}")
