"""Remote-provider concurrency: tasks/s against a backend whose calls take 200 ms +- 50 ms.

    .venv/bin/python bench/remote_concurrency.py --rounds 2 --levels 1,8,64,256,1024

A local server speaking the OpenAI Chat Completions protocol (the payloads of
``tests/providers/wire.py``) runs in its own process and answers each call after
``--latency`` +- ``--jitter`` seconds, the offset drawn from the prompt (the same prompt waits
as long for every system), so at concurrency N the best rate is N / latency calls/s. Per level
N, per round, interleaved (the order turns each round), ``--tasks`` calls (default 25 x N,
capped at ``--max-tasks``) through:

* ``sdk-httpx``: the OpenAI SDK as shipped (``AsyncOpenAI()``, its default httpx client);
* ``sdk-aiohttp``: the OpenAI SDK with its aiohttp client (``openai.DefaultAioHttpClient``,
  a pool of N connections);
* ``litellm``: LiteLLM's ``Router.acompletion`` (from ``bench/.venv-peers``, made with
  ``python3 -m venv bench/.venv-peers && bench/.venv-peers/bin/pip install -e . litellm
  uvloop``; skipped when that venv is missing), each of these N calls at a time, plain
  (non-streaming) requests, in a process of its own (uvloop when installed) with no Redis;
* ``sop-1``, ``sop-2``: sop-llm, one or two ``python -m sop_llm.ops.cli worker`` processes whose
  models
  file declares an ``openai_compatible`` model at the fake server with concurrency N (two
  workers: N/2 each, N in all); the tasks are submitted by this process, 128 submits at a
  time, and the rate is the task count over the time from the first submit to the moment the
  results stream holds them all. ``slots busy``: the time the tasks ran (``run_ms``) over
  the wall time and N, the share of the worker's slots that held a task on average.

Each run starts with N warm-up calls (connections opened; not counted). CPU per call is the
measured process's own (the workers' from ``/proc``); the fake server's is in the progress
lines (stderr). The
namespace's keys are deleted after each sop-llm run (SCAN + UNLINK of that namespace only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from bench import consumers  # noqa: E402
from bench.redisutil import delete_namespace  # noqa: E402
from bench.sampling import cpu_seconds, stopping  # noqa: E402
from tests.providers.wire import oa_completion  # noqa: E402

MODEL = "bench-remote"
ANSWER = "A short answer from the fake backend."
PEERS_PYTHON = ROOT / "bench" / ".venv-peers" / "bin" / "python"
BARE = ("sdk-httpx", "sdk-aiohttp", "litellm")
SYSTEMS = (*BARE, "sop-1", "sop-2")


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """On uvloop when it is installed, as ``sop-llm`` itself runs."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


# ---- the fake backend (its own process: `--serve`) ---------------------------------------


async def serve(latency: float, jitter: float) -> None:
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = str(body["messages"][-1]["content"])
        await asyncio.sleep(
            latency + random.Random(zlib.crc32(prompt.encode())).uniform(-1, 1) * jitter
        )
        return web.json_response(oa_completion(ANSWER, prompt_tokens=12, completion_tokens=8))

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


# ---- the bare clients (each its own process: `--bare KIND`) ------------------------------


async def bare(kind: str, port: int, n: int, tasks: int) -> dict[str, float]:
    """``tasks`` plain calls, ``n`` at a time, through ``kind``: calls/s and CPU ms per call."""
    base_url = f"http://127.0.0.1:{port}/v1"
    call: Callable[[str], Awaitable[Any]]
    if kind == "litellm":
        os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no download at import
        from litellm import Router  # type: ignore[import-not-found,unused-ignore]

        router = Router(
            model_list=[{"model_name": MODEL, "litellm_params": {
                "model": "openai/gpt-bench", "api_base": base_url, "api_key": "sk-bench"}}],
            num_retries=0, timeout=30,
        )  # fmt: skip

        def call(prompt: str) -> Awaitable[Any]:
            messages = [{"role": "user", "content": prompt}]
            return router.acompletion(model=MODEL, messages=messages, max_tokens=8)  # type: ignore[no-any-return,unused-ignore]

        async def close() -> None:
            return None

    else:
        import httpx2
        import openai

        http_client = None
        if kind == "sdk-aiohttp":
            limits = httpx2.Limits(max_connections=n, max_keepalive_connections=n)
            http_client = openai.DefaultAioHttpClient(limits=limits)
        client = openai.AsyncOpenAI(
            api_key="sk-bench", base_url=base_url, max_retries=0, timeout=30,
            http_client=http_client,
        )  # fmt: skip

        def call(prompt: str) -> Awaitable[Any]:
            messages: Any = [{"role": "user", "content": prompt}]
            return client.chat.completions.create(
                model="gpt-bench", messages=messages, max_tokens=8
            )

        close = client.close
    limit = asyncio.Semaphore(n)

    async def one(prompt: str) -> None:
        async with limit:
            await call(prompt)

    await asyncio.gather(*(one(f"warm {i}") for i in range(n)))
    cpu, began = os.times(), time.perf_counter()
    await asyncio.gather(*(one(f"question {i}") for i in range(tasks)))
    wall, after = time.perf_counter() - began, os.times()
    await close()
    used = after.user + after.system - cpu.user - cpu.system
    return {"rate": tasks / wall, "cpu_ms": used * 1000 / tasks}


def run_bare(kind: str, port: int, n: int, tasks: int) -> dict[str, float] | None:
    python = str(PEERS_PYTHON) if kind == "litellm" else sys.executable
    if kind == "litellm" and not PEERS_PYTHON.exists():
        return None
    cmd = [python, __file__, "--bare", kind, "--port", str(port), "--n", str(n),
           "--tasks", str(tasks)]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} N={n} failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# ---- sop-llm ------------------------------------------------------------------------------


def start_workers(
    redis_url: str, namespace: str, port: int, n: int, workers: int, workdir: Path
) -> list[subprocess.Popen[bytes]]:
    each = max(1, n // workers)
    models_file = workdir / f"models-{namespace}.toml"
    models_file.write_text(
        f'[models.{MODEL}]\nprovider = "openai_compatible"\nmodel_id = "gpt-bench"\n'
        f'base_url = "http://127.0.0.1:{port}/v1"\nconcurrency = {each}\ntimeout_s = 30\n'
    )
    env = {"SOP_MODELS_FILE": str(models_file), "SOP_WORKER_SLOTS": str(each),
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    log = workdir / "worker.log"
    return [consumers.spawn("sop", redis_url, namespace, log, env=env) for _ in range(workers)]


async def submit_all(producer: Any, prompts: list[str]) -> list[str]:
    limit = asyncio.Semaphore(128)

    async def one(prompt: str) -> str:
        async with limit:
            return str(await producer.submit(MODEL, prompt, max_tokens=8))

    return list(await asyncio.gather(*(one(p) for p in prompts)))


async def run_sop(
    args: argparse.Namespace, port: int, n: int, tasks: int, workers: int, tmp: Path
) -> dict[str, float]:
    from sop_llm.schemas.result import TaskResult, TaskState
    from sop_llm.streams.keys import Keys
    from sop_llm.streams.producer import Producer, ProducerConfig

    namespace = f"bench-{uuid.uuid4().hex[:12]}"
    keys = Keys(namespace)
    client = Redis.from_url(args.redis_url, socket_timeout=30, max_connections=256)
    producer = Producer(ProducerConfig(namespace=namespace), client=client)
    procs = start_workers(args.redis_url, namespace, port, n, workers, tmp)
    try:
        try:
            async with asyncio.timeout(120):
                for task_id in await submit_all(producer, [f"warm {i}" for i in range(n)]):
                    await producer.wait(task_id, timeout=120)
        except Exception:
            sys.stderr.write((tmp / "worker.log").read_text()[-3000:])
            raise
        base = await client.xlen(keys.results)
        cpu = sum(cpu_seconds(p.pid) for p in procs)
        began = time.perf_counter()
        await submit_all(producer, [f"question {i}" for i in range(tasks)])
        deadline = began + 120 + tasks * args.latency
        while await client.xlen(keys.results) < base + tasks:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"N={n}: results did not arrive in time")
            await asyncio.sleep(0.005)
        wall = time.perf_counter() - began
        used = sum(cpu_seconds(p.pid) for p in procs) - cpu
        entries: Any = await client.xrange(keys.results)
        done = [TaskResult.model_validate_json(f[b"data"]) for _, f in entries][n:]
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a worker exited early")
        failed = sum(1 for r in done if r.state != TaskState.COMPLETED)
        # the share of the N slots busy with a call on average (the rest: between two tasks)
        busy = sum(r.run_ms for r in done) / 1000 / wall / n
        return {"rate": tasks / wall, "cpu_ms": used * 1000 / tasks, "failed": failed,
                "busy": busy}  # fmt: skip
    finally:
        for p in procs:
            with stopping(p):
                pass
        await delete_namespace(client, namespace)
        await client.aclose()


# ---- the driver --------------------------------------------------------------------------


def start_server(latency: float, jitter: float) -> tuple[subprocess.Popen[bytes], int]:
    cmd = [sys.executable, __file__, "--serve", "--latency", str(latency), "--jitter", str(jitter)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise RuntimeError("the fake server did not start")
    return proc, int(line)


Results = dict[tuple[int, str], list[dict[str, float]]]


def table(results: Results, levels: list[int], args: argparse.Namespace) -> str:
    def rate(n: int, system: str) -> float:
        runs = results.get((n, system), [])
        return statistics.median(r["rate"] for r in runs) if runs else float("nan")

    def cell(n: int, system: str) -> str:
        runs = results.get((n, system), [])
        if not runs:
            return "-"
        cpu = statistics.median(r["cpu_ms"] for r in runs)
        failed = sum(int(r.get("failed", 0)) for r in runs)
        return f"{rate(n, system):,.0f} ({cpu:.2f} ms)" + (f" {failed} failed" if failed else "")

    def busy(n: int) -> float:
        runs = results.get((n, "sop-1"), [])
        return statistics.median(r["busy"] for r in runs) if runs else float("nan")

    out = [
        f"backend {args.latency * 1000:.0f} ms +- {args.jitter * 1000:.0f} ms, {args.rounds} "
        "round(s), systems interleaved; calls/s (CPU ms per call), medians over rounds",
        "",
        "| N | calls | ideal | SDK httpx | SDK aiohttp | LiteLLM Router | sop-llm 1 worker | "
        "sop-llm 2 workers | 1w / ideal | 1w / SDK aiohttp | 2w / 1w | 1w / LiteLLM | "
        "1w slots busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in levels:
        ideal = n / args.latency
        one, two = rate(n, "sop-1"), rate(n, "sop-2")
        out.append(
            f"| {n} | {tasks_for(n, args)} | {ideal:,.0f} | "
            + " | ".join(cell(n, s) for s in SYSTEMS)
            + f" | {one / ideal:.2f} | {one / rate(n, 'sdk-aiohttp'):.2f} | {two / one:.2f} | "
            f"{one / rate(n, 'litellm'):.2f} | {busy(n):.2f} |"
        )
    return "\n".join(out)


def tasks_for(n: int, args: argparse.Namespace) -> int:
    return int(args.tasks or min(25 * n, args.max_tasks))


async def main(args: argparse.Namespace) -> None:
    levels = [int(n) for n in args.levels.split(",")]
    systems = [s for s in SYSTEMS if s in args.systems.split(",")]
    server, port = start_server(args.latency, args.jitter)
    results: Results = {}
    with stopping(server), tempfile.TemporaryDirectory(prefix="sop-bench-") as tmp:
        for r in range(args.rounds):
            for n in levels:
                order = systems[r % len(systems) :] + systems[: r % len(systems)]
                for system in order:
                    tasks = tasks_for(n, args)
                    cpu_s = cpu_seconds(server.pid)
                    if system.startswith("sop-"):
                        workers = int(system.removeprefix("sop-"))
                        if n < workers:
                            continue  # N in all cannot be split
                        res: dict[str, float] | None = await run_sop(
                            args, port, n, tasks, workers, Path(tmp)
                        )
                    else:
                        res = await asyncio.to_thread(run_bare, system, port, n, tasks)
                    if res is None:
                        continue
                    res["server_cpu_ms"] = (cpu_seconds(server.pid) - cpu_s) * 1000 / tasks
                    results.setdefault((n, system), []).append(res)
                    print(f"round {r} N={n} {system}: {json.dumps(res)}", file=sys.stderr)
    print(table(results, levels, args))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--levels", default="1,8,64,256,1024", help="concurrency levels N")
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help="which of " + ", ".join(SYSTEMS)
    )
    parser.add_argument("--tasks", type=int, default=0, help="calls per run (0: 25 x N, capped)")
    parser.add_argument("--max-tasks", type=int, default=4000, help="cap on the 25 x N default")
    parser.add_argument("--latency", type=float, default=0.2, help="backend seconds per call")
    parser.add_argument("--jitter", type=float, default=0.05, help="+- seconds around it")
    parser.add_argument(
        "--redis-url", default=os.environ.get("SOP_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare", choices=BARE, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.serve:
        run(serve(parsed.latency, parsed.jitter))
    elif parsed.bare:
        print(json.dumps(run(bare(parsed.bare, parsed.port, parsed.n, parsed.tasks))))
    else:
        run(main(parsed))
