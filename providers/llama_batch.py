"""llama.cpp with continuous batching: ``parallel = N`` sequences decoded together.

One llama context holds N sequences (``n_seq_max``, a KV stream each, not unified, so a
sequence attends only to its own cells). A loop in the model's thread builds one
``llama_batch`` per step: every active sequence's next group of tokens with its own seq id
(a 64-token prompt chunk at a fixed offset, the prompt's last token, or the token it sampled
last), then one ``llama_decode`` and one sample per sequence that asked for logits, each with
its own sampler chain (grammar, temperature, top_p, seed). A sequence groups its tokens
exactly as :class:`~providers.llama_cpp.LlamaCppProvider` does alone (prompt chunks at fixed
offsets, the last prompt token alone, then one token per step) with the same sampler chain,
so temperature 0 gives the text it gives alone (see ``tests/providers/test_llama_batch.py``).

A ``generate`` call joins the running batch at the next step (the worker hands the model up to
N calls at once, the highest-priority waiting task first); a sequence that ends (stop,
max_tokens, cancelled, its deadline) leaves at the next step and its KV cells are freed at
once (``llama_memory_seq_rm``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from sop_llm.providers.base import Capabilities, DeltaSink, Generation, GenerationRequest, Spent
from sop_llm.providers.errors import InternalProviderError
from sop_llm.providers.gguf_shape import GgufShape, estimate_bytes
from sop_llm.providers.llama_chat import chat_format
from sop_llm.providers.llama_cpp import (
    _CHUNK,
    LlamaCppProvider,
    LlamaOptions,
    _Job,
    _Model,
    until_stopped,
)
from sop_llm.providers.text import TextAssembler
from sop_llm.schemas.result import FinishReason, Usage

RESERVED = 1
"""Sequences beyond ``parallel``, for ``high`` tasks only (the worker gives one to a task of
the pool's first partition when the other N are busy): a ``high`` task arriving at a full
batch joins at the next step instead of waiting for a sequence to end."""

# llama-cpp-python's sampler chain at a temperature above 0 (Llama._init_sampler's defaults)
_TOP_K = 40
_MIN_P = 0.05


@dataclass(eq=False, slots=True)
class _Seq:
    """One generation in the batch."""

    job: _Job
    text: TextAssembler
    spent: Spent
    cancel: threading.Event
    done: concurrent.futures.Future[Generation]
    pending: collections.deque[list[int]] = field(default_factory=collections.deque)
    seq_id: int = -1
    pos: int = 0
    sampler: Any = None
    produced: int = 0
    counted: bool = False
    logit_index: int = -1


class _Engine:
    """The context, its batch and the step loop (which runs in the model's thread)."""

    def __init__(self, llm: llama_cpp.Llama, *, parallel: int, n_ctx: int, chunk: int) -> None:
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        self._capacity = max(parallel * chunk, 1)
        params.n_ctx = n_ctx * parallel
        params.n_batch = params.n_ubatch = self._capacity
        params.n_seq_max = parallel
        params.kv_unified = False
        ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not ctx:
            raise InternalProviderError("llama.cpp could not create a batched context")
        self.ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(self._capacity, 0, 1)
        self._vocab = llm._model.vocab
        self._chunk = chunk
        self.window: int = min(n_ctx, int(llama_cpp.llama_n_ctx_seq(ctx)))
        self._free = list(range(parallel))
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._active: list[_Seq] = []
        self._guard = threading.Lock()
        self._running = False

    def close(self) -> None:
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self.ctx)

    def submit(self, seq: _Seq, executor: concurrent.futures.Executor) -> None:
        """Queue ``seq``; it joins at the next step (starting the loop when none runs)."""
        with self._guard:
            self._waiting.append(seq)
            if self._running:
                return
            self._running = True
        executor.submit(self._loop)

    def _loop(self) -> None:
        while True:
            with self._guard:
                while self._waiting and self._free:
                    self._join(self._waiting.popleft(), min(self._free))
                if not self._active:
                    self._running = False
                    return
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - every sequence fails, the loop goes on
                error = InternalProviderError(f"llama.cpp failed: {exc}")
                for seq in list(self._active):
                    self._end(seq, None, error)

    def _join(self, seq: _Seq, seq_id: int) -> None:
        self._free.remove(seq_id)
        seq.seq_id = seq_id
        job = seq.job
        body = job.tokens[:-1]
        seq.pending.extend(body[i : i + self._chunk] for i in range(0, len(body), self._chunk))
        seq.pending.append(job.tokens[-1:])
        seq.sampler = _sampler(self._vocab, job)
        self._active.append(seq)

    def _step(self) -> None:
        batch = self._batch
        n = 0
        sampling: list[_Seq] = []
        for seq in list(self._active):
            if seq.cancel.is_set():
                self._end(seq, "cancelled")
                continue
            group = seq.pending.popleft()
            for i, token in enumerate(group):
                batch.token[n] = token
                batch.pos[n] = seq.pos + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq.seq_id
                batch.logits[n] = 0
                n += 1
            seq.pos += len(group)
            if not seq.pending:  # the prompt's last token, or the token sampled last
                batch.logits[n - 1] = 1
                seq.logit_index = n - 1
                sampling.append(seq)
        if n == 0:
            return
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        for seq in sampling:
            self._advance(seq)

    def _advance(self, seq: _Seq) -> None:
        job = seq.job
        if not seq.counted:
            seq.counted = True
            seq.spent.input_tokens += len(job.tokens)
            if job.max_tokens <= 0:
                self._end(seq, "length")
                return
        if seq.cancel.is_set():
            self._end(seq, "cancelled")
            return
        token = llama_cpp.llama_sampler_sample(seq.sampler, self.ctx, seq.logit_index)
        if token in job.stop_ids or llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._end(seq, "stop")
            return
        seq.produced += 1
        seq.spent.output_tokens += 1
        if seq.text.add(LlamaCppProvider._piece(self._vocab, token)):
            self._end(seq, "stop")
        elif seq.produced >= job.max_tokens:
            self._end(seq, "length")
        else:
            seq.pending.append([token])

    def _end(self, seq: _Seq, finish: FinishReason | None, error: Exception | None = None) -> None:
        """Take ``seq`` out of the batch, free its KV cells and sampler, and answer it."""
        llama_cpp.llama_memory_seq_rm(self._mem, seq.seq_id, -1, -1)
        llama_cpp.llama_sampler_free(seq.sampler)
        if not seq.counted:  # cut short in its prompt: counted as the one-at-a-time path does
            seq.counted = True
            seq.spent.input_tokens += len(seq.job.tokens)
        with self._guard:
            self._active.remove(seq)
            self._free.append(seq.seq_id)
        if error is not None:
            seq.done.set_exception(error)
            return
        assert finish is not None
        usage = Usage(input_tokens=len(seq.job.tokens), output_tokens=seq.produced)
        seq.done.set_result(Generation(text=seq.text.finish(), finish_reason=finish, usage=usage))


def _sampler(vocab: Any, job: _Job) -> Any:
    """The chain llama-cpp-python's ``Llama.generate`` builds for the same parameters (its
    repeat penalty of 1.0 is a no-op and left out)."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if job.grammar is not None:
        gbnf = job.grammar._grammar.encode()
        add(chain, llama_cpp.llama_sampler_init_grammar(vocab, gbnf, b"root"))
    if job.temperature == 0.0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
    else:
        add(chain, llama_cpp.llama_sampler_init_top_k(_TOP_K))
        add(chain, llama_cpp.llama_sampler_init_typical(1.0, 1))
        add(chain, llama_cpp.llama_sampler_init_top_p(job.top_p, 1))
        add(chain, llama_cpp.llama_sampler_init_min_p(_MIN_P, 1))
        add(chain, llama_cpp.llama_sampler_init_temp(job.temperature))
        add(chain, llama_cpp.llama_sampler_init_dist(job.seed))
    return chain


class LlamaBatchProvider(LlamaCppProvider):
    """A GGUF model serving ``options.parallel`` generations at once in one batch."""

    def __init__(self, *, name: str, options: LlamaOptions, shape: GgufShape) -> None:
        super().__init__(name=name, options=options, shape=shape)
        # the KV cache holds the reserved sequence too
        self._estimate = estimate_bytes(
            shape,
            n_gpu_layers=options.n_gpu_layers,
            n_ctx=options.n_ctx * (options.parallel + RESERVED),
        )
        self._engine: _Engine | None = None
        self._capabilities = Capabilities(
            streaming=True,
            structured_output="grammar",
            needs_gpu_slot=True,
            max_concurrency=options.parallel,
            reserved=RESERVED,
        )

    def _open(self) -> _Model:
        options = self._options
        chunk = min(_CHUNK, options.n_batch)
        try:
            # the Llama object gives the vocabulary, tokenizer and chat template; its own
            # context is kept small: generation runs in the engine's
            llm = llama_cpp.Llama(
                model_path=options.path,
                n_ctx=chunk,
                n_gpu_layers=options.n_gpu_layers,
                n_threads=options.n_threads,
                n_threads_batch=options.n_threads,
                n_batch=chunk,
                verbose=False,
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise InternalProviderError(
                f"{self._name}: cannot load {options.path}: {exc}", retryable=False
            ) from exc
        try:
            self._engine = _Engine(
                llm, parallel=options.parallel + RESERVED, n_ctx=options.n_ctx, chunk=chunk
            )
        except BaseException:
            llm.close()
            raise
        return _Model(llm=llm, chat=chat_format(llm, options.chat_template))

    def _window(self, model: _Model) -> int:
        assert self._engine is not None
        return self._engine.window

    async def unload(self) -> None:
        async with self._lock:
            model, self._model = self._model, None
            engine, self._engine = self._engine, None
            self._grammars.clear()
            if model is None:
                return

            def close() -> None:  # after the step loop: the executor runs one thing at a time
                if engine is not None:
                    engine.close()
                model.llm.close()

            await asyncio.get_running_loop().run_in_executor(self._executor, close)

    async def generate(
        self, request: GenerationRequest, *, on_delta: DeltaSink | None = None
    ) -> Generation:
        loop = asyncio.get_running_loop()
        async with self._lock:  # held only to load and join, so unload waits for its turn
            await self._load_locked()
            engine = self._engine
            assert engine is not None
            # tokenizing (and a new grammar's check) off the event loop; the model's own
            # thread may be busy with the batch
            job = await asyncio.to_thread(self._prepare, request)
            sink: Callable[[str], None] | None = None
            if on_delta is not None:
                callback = on_delta

                def sink(text: str) -> None:
                    loop.call_soon_threadsafe(callback, text)

            seq = _Seq(
                job=job,
                text=TextAssembler(job.stop, sink),
                spent=request.spent,
                cancel=threading.Event(),
                done=concurrent.futures.Future(),
            )
            engine.submit(seq, self._executor)
        # cancelled, the sequence leaves the batch at the next step
        return await until_stopped(asyncio.wrap_future(seq.done), seq.cancel)
