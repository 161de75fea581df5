"""Remote-provider concurrency benchmark: tasks/s against a backend that takes 200 ms a call.

    .venv/bin/python bench/remote_concurrency.py --rounds 3 --levels 1,8,64

A local server speaking the OpenAI Chat Completions protocol (JSON and SSE, the payloads of
``tests/providers/wire.py``) runs in its own process and answers every call after
``--latency`` seconds (default 0.2), so at concurrency N the best possible rate is
N / latency tasks/s. Per level N, per round (levels interleaved within each round):

1. a fresh namespace (``bench-<hex>``) and a real worker process (``python -m ops.cli
   worker``) whose ``SOP_MODELS_FILE`` declares one ``openai`` model at the fake server with
   ``concurrency = N``, and ``SOP_WORKER_SLOTS = N``;
2. one warm-up task (start-up, connections; not counted);
3. ``--tasks`` tasks (default 25 x N, i.e. 25 latency periods at the ideal rate) published
   with the SDK as fast as it goes, while the results stream is polled; ``tasks/s`` is the
   task count over the wall time from the first submit to the moment the results stream holds
   them all;
4. the reference: the same number of calls through the same provider adapter (the OpenAI
   SDK, streaming as the worker does), N at a time, in this process, with no Redis and no
   worker: the ceiling of the SDK's HTTP stack on this machine.

The target is >= 0.9 x N / latency. CPU seconds of the worker and of the fake server
(``/proc``) are reported per task. The namespace's keys are deleted after each run (SCAN +
UNLINK of that namespace only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from bench import consumers  # noqa: E402
from bench.redisutil import delete_namespace  # noqa: E402
from bench.sampling import cpu_seconds, stopping  # noqa: E402
from providers.base import GenerationRequest  # noqa: E402
from providers.factory import build_provider  # noqa: E402
from schemas.models import ModelSpec  # noqa: E402
from schemas.result import TaskResult, TaskState  # noqa: E402
from streams.keys import Keys  # noqa: E402
from streams.producer import Producer, ProducerConfig  # noqa: E402
from tests.providers.wire import oa_chunks, oa_completion  # noqa: E402

MODEL = "bench-remote"
ANSWER = "A short answer from the fake backend."


# ---- the fake backend (its own process: `--serve`) ---------------------------------------


async def serve(latency: float) -> None:
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        await asyncio.sleep(latency)
        if not body.get("stream"):
            return web.json_response(oa_completion(ANSWER, prompt_tokens=12, completion_tokens=8))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunks = oa_chunks([ANSWER[:10], ANSWER[10:]], usage=(12, 8))
        data = "".join(f"data: {json.dumps(c)}\n\n" for _, c in chunks) + "data: [DONE]\n\n"
        await resp.write(data.encode())
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


def run(main: Coroutine[Any, Any, None]) -> None:
    """On uvloop when it is installed, as ``sop-llm`` itself runs."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def run_server(latency: float) -> None:
    run(serve(latency))


# ---- the measured side -------------------------------------------------------------------


def start_server(latency: float) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--latency", str(latency)],
        cwd=ROOT, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise RuntimeError("the fake server did not start")
    return proc, int(line)


def start_worker(
    redis_url: str, namespace: str, port: int, n: int, workdir: Path
) -> subprocess.Popen[bytes]:
    models_file = workdir / f"models-{namespace}.toml"
    models_file.write_text(
        f'[models.{MODEL}]\nprovider = "openai"\nmodel_id = "gpt-bench"\n'
        f'base_url = "http://127.0.0.1:{port}/v1"\napi_key_env = "BENCH_OPENAI_KEY"\n'
        f"concurrency = {n}\ntimeout_s = 30\n"
    )
    env = {
        "SOP_MODELS_FILE": str(models_file), "SOP_WORKER_SLOTS": str(n),
        "BENCH_OPENAI_KEY": "sk-bench", "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    return consumers.spawn("sop", redis_url, namespace, workdir / "worker.log", env=env)


@dataclass(slots=True)
class Level:
    n: int
    rates: list[float] = field(default_factory=list)
    direct_rates: list[float] = field(default_factory=list)
    worker_cpu_ms: list[float] = field(default_factory=list)
    server_cpu_ms: list[float] = field(default_factory=list)
    failed: int = 0


async def run_once(
    level: Level, tasks: int, args: argparse.Namespace, port: int, server_pid: int, tmp: Path
) -> None:
    namespace = f"bench-{uuid.uuid4().hex[:12]}"
    keys = Keys(namespace)
    client = Redis.from_url(args.redis_url, socket_timeout=30)
    producer = Producer(ProducerConfig(namespace=namespace), client=client)
    try:
        with stopping(start_worker(args.redis_url, namespace, port, level.n, tmp)) as worker:
            warm = await producer.submit(MODEL, "warm up", max_tokens=8)
            try:
                await producer.wait(warm, timeout=60)
            except Exception:
                sys.stderr.write((tmp / "worker.log").read_text()[-3000:])
                raise
            base = await client.xlen(keys.results)
            cpu_w, cpu_s = cpu_seconds(worker.pid), cpu_seconds(server_pid)
            began = time.perf_counter()
            for i in range(tasks):
                await producer.submit(MODEL, f"question {i}", max_tokens=8)
            deadline = began + 60 + tasks * args.latency  # far past any sane run
            while await client.xlen(keys.results) < base + tasks:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"N={level.n}: results did not arrive in time")
                await asyncio.sleep(0.005)
            wall = time.perf_counter() - began
            level.rates.append(tasks / wall)
            level.worker_cpu_ms.append((cpu_seconds(worker.pid) - cpu_w) * 1000 / tasks)
            level.server_cpu_ms.append((cpu_seconds(server_pid) - cpu_s) * 1000 / tasks)
            entries: Any = await client.xrange(keys.results)
            states = [TaskResult.model_validate_json(f[b"data"]).state for _, f in entries]
            level.failed += sum(1 for s in states if s != TaskState.COMPLETED)
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited early ({worker.returncode})")
    finally:
        await delete_namespace(client, namespace)
        await client.aclose()


def model_spec(port: int, n: int) -> ModelSpec:
    return ModelSpec(
        name=MODEL, provider="openai", model_id="gpt-bench", api_key_env="BENCH_OPENAI_KEY",
        base_url=f"http://127.0.0.1:{port}/v1", concurrency=n, timeout_s=30,
    )  # fmt: skip


async def run_direct(level: Level, tasks: int, port: int) -> None:
    """The reference: the same calls through the same provider adapter (the OpenAI SDK), in
    this process, ``n`` at a time, with no Redis and no worker: the SDK's own ceiling here."""
    provider = build_provider(model_spec(port, level.n), env={"BENCH_OPENAI_KEY": "sk-bench"})
    limit = asyncio.Semaphore(level.n)

    async def one(i: int) -> None:
        request = GenerationRequest(model=MODEL, prompt=f"question {i}", max_tokens=8)
        async with limit:
            # a sink, as the worker passes one (it streams every call)
            await provider.generate(request, on_delta=lambda _: None)

    try:
        await one(-1)  # warm up: connection, imports
        began = time.perf_counter()
        async with asyncio.timeout(60 + tasks * 0.2):
            await asyncio.gather(*(one(i) for i in range(tasks)))
        level.direct_rates.append(tasks / (time.perf_counter() - began))
    finally:
        await provider.aclose()


def table(levels: list[Level], args: argparse.Namespace, tasks_of: dict[int, int]) -> str:
    med = statistics.median
    out = [
        f"backend latency {args.latency * 1000:.0f} ms, {args.rounds} rounds, levels "
        f"interleaved; medians over rounds (min-max in brackets)",
        "",
        "| concurrency N | tasks per run | sop-llm tasks/s | ideal N / latency | target "
        "(0.9 x ideal) | sop-llm / ideal | direct SDK calls/s (no Redis, no worker) | "
        "direct / ideal | worker CPU ms per task | fake server CPU ms per task | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        ideal = lv.n / args.latency
        rate = med(lv.rates)
        verdict = "meets" if rate >= 0.9 * ideal else "BELOW"
        out.append(
            f"| {lv.n} | {tasks_of[lv.n]} | {rate:,.1f} ({min(lv.rates):,.1f}-"
            f"{max(lv.rates):,.1f}) | {ideal:,.0f} | {0.9 * ideal:,.1f} | **{rate / ideal:.3f}** "
            f"({verdict}) | {med(lv.direct_rates):,.1f} | {med(lv.direct_rates) / ideal:.3f} | "
            f"{med(lv.worker_cpu_ms):.2f} | {med(lv.server_cpu_ms):.2f} | {lv.failed} |"
        )
    return "\n".join(out)


async def main(args: argparse.Namespace) -> None:
    levels = [Level(int(n)) for n in args.levels.split(",")]
    tasks_of = {lv.n: args.tasks or 25 * lv.n for lv in levels}
    server, port = start_server(args.latency)
    with stopping(server), tempfile.TemporaryDirectory(prefix="sop-bench-") as tmp:
        for r in range(args.rounds):
            for lv in levels if r % 2 == 0 else reversed(levels):
                await run_once(lv, tasks_of[lv.n], args, port, server.pid, Path(tmp))
                await run_direct(lv, tasks_of[lv.n], port)
                print(
                    f"round {r} N={lv.n}: sop-llm {lv.rates[-1]:.1f} tasks/s, "
                    f"direct {lv.direct_rates[-1]:.1f} calls/s",
                    file=sys.stderr,
                )
    print(table(levels, args, tasks_of))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--tasks", type=int, default=0, help="tasks per run at every level (0: 25 x N)"
    )
    parser.add_argument("--levels", default="1,8,64", help="concurrency levels N")
    parser.add_argument("--latency", type=float, default=0.2, help="backend seconds per call")
    parser.add_argument(
        "--redis-url", default=os.environ.get("SOP_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.serve:
        run_server(parsed.latency)
    else:
        run(main(parsed))
