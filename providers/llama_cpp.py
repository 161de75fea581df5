"""llama.cpp in-process: a GGUF model run by llama-cpp-python in a thread of its own.

One model, one context, one generation at a time (``max_concurrency`` 1, and it takes a GPU
slot). Building the provider reads only the GGUF header (for :meth:`estimated_bytes`, the
device memory admission checks); the weights load on :meth:`LlamaCppProvider.load` (in the
model's thread), or on the first ``generate`` when nothing loaded them, and are freed on
``unload`` (the :class:`~providers.base.Loadable` protocol). Generation runs token by token in
the model's own thread; text goes to ``on_delta`` on the event loop's thread as it is
produced. Cancelling ``generate`` (a cancelled task, a deadline) sets a
:class:`threading.Event` the thread checks before every token (and between prompt batches);
``generate`` returns only after the thread has stopped, so the model is idle again when the
caller releases its GPU slot.

Chat tasks are rendered with the model's chat template (``providers/llama_chat.py``: the
spec's ``chat_template``, else the file's; neither: a chat task is a ``bad_request``), and
generation stops at the template's end-of-turn tokens. A prompt is evaluated in chunks at
fixed offsets and only whole chunks of the previous prompt are reused from the KV cache
(:meth:`LlamaCppProvider._prefill`), so a seed or temperature 0 gives the same text whatever
task ran before.

Structured output: a JSON Schema becomes a GBNF grammar (``providers/grammar.py``) checked
once by llama.cpp's parser and cached per schema hash; the schema is also shown to the model
in the prompt, and the output is validated (``providers/structured.py``). A raw GBNF grammar
(``response_format`` type ``grammar``) is used as given, after the same check.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import llama_cpp
from llama_cpp.llama_grammar import LlamaGrammar

from sop_llm.providers.base import Capabilities, DeltaSink, Generation, GenerationRequest, Spent
from sop_llm.providers.errors import BadRequestError, ContextLengthError, InternalProviderError
from sop_llm.providers.gguf_shape import GgufShape, estimate_bytes, read_shape
from sop_llm.providers.grammar import schema_to_gbnf
from sop_llm.providers.llama_chat import ChatFormat, chat_format, render_chat, unmatchable_token
from sop_llm.providers.structured import schema_instruction, schema_of, with_instruction
from sop_llm.providers.text import TextAssembler
from sop_llm.schemas.result import FinishReason, Usage

# llama.cpp's "pick a random seed" value; a task's seed is folded into 32 bits below it
_RANDOM_SEED = 0xFFFFFFFF
_GRAMMAR_CACHE = 128
# prompts are evaluated in chunks of this many tokens at fixed offsets (see _prefill)
_CHUNK = 64


@dataclass(frozen=True, slots=True)
class LlamaOptions:
    path: str
    n_ctx: int = 4096
    n_gpu_layers: int = 0
    n_threads: int | None = None
    n_batch: int = 512
    chat_template: str | None = None
    # sequences decoded together (providers/llama_batch.py); 1: one task at a time, here
    parallel: int = 1


@dataclass(frozen=True, slots=True)
class _Job:
    tokens: list[int]
    max_tokens: int
    stop: tuple[str, ...]
    temperature: float
    top_p: float
    seed: int
    grammar: LlamaGrammar | None
    stop_ids: frozenset[int]


@dataclass(slots=True)
class _Model:
    """A loaded model and what is derived from it."""

    llm: llama_cpp.Llama
    chat: ChatFormat
    # the prompt tokens whose KV the cache holds from whole chunks (see _prefill)
    chunked: list[int] = field(default_factory=list)


class LlamaCppProvider:
    """A GGUF model, loaded on :meth:`load` (or by the first ``generate``), freed on
    :meth:`unload`. Building one (:meth:`build`) reads only the GGUF header."""

    def __init__(self, *, name: str, options: LlamaOptions, shape: GgufShape) -> None:
        self._name = name
        self._options = options
        self._shape = shape
        self._estimate = estimate_bytes(
            shape, n_gpu_layers=options.n_gpu_layers, n_ctx=options.n_ctx * options.parallel
        )
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"llama-{name}"
        )
        self._grammars: OrderedDict[str, LlamaGrammar] = OrderedDict()
        self._model: _Model | None = None
        # held across load, unload and each generation: one of them at a time
        self._lock = asyncio.Lock()
        self._capabilities = Capabilities(
            streaming=True, structured_output="grammar", needs_gpu_slot=True, max_concurrency=1
        )

    @classmethod
    def build(cls, *, name: str, options: LlamaOptions) -> LlamaCppProvider:
        """A provider for ``options.path``, not loaded yet (blocking: reads the GGUF header).
        Raises ``OSError`` (no such file) or ``ValueError`` (not a GGUF model)."""
        return cls(name=name, options=options, shape=read_shape(options.path))

    @property
    def name(self) -> str:
        return self._name

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def options(self) -> LlamaOptions:
        return self._options

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def estimated_bytes(self) -> int:
        return self._estimate

    async def load(self) -> None:
        async with self._lock:
            await self._load_locked()

    async def unload(self) -> None:
        async with self._lock:
            model, self._model = self._model, None
            self._grammars.clear()
            if model is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, model.llm.close)

    async def aclose(self) -> None:
        await self.unload()
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def _load_locked(self) -> None:
        if self._model is not None:
            return
        loop = asyncio.get_running_loop()
        self._model = await loop.run_in_executor(self._executor, self._open)

    def _open(self) -> _Model:
        options = self._options
        try:
            llm = llama_cpp.Llama(
                model_path=options.path,
                n_ctx=options.n_ctx,
                n_gpu_layers=options.n_gpu_layers,
                n_threads=options.n_threads,
                n_threads_batch=options.n_threads,
                n_batch=options.n_batch,
                verbose=False,
            )
        except (OSError, ValueError, RuntimeError) as exc:  # what llama.cpp raises for a bad file
            raise InternalProviderError(
                f"{self._name}: cannot load {options.path}: {exc}", retryable=False
            ) from exc
        return _Model(llm=llm, chat=chat_format(llm, options.chat_template))

    async def generate(
        self, request: GenerationRequest, *, on_delta: DeltaSink | None = None
    ) -> Generation:
        async with self._lock:
            await self._load_locked()  # a no-op when admission (or an earlier call) loaded it
            assert self._model is not None
            return await self._generate(self._model, request, on_delta)

    async def _generate(
        self, model: _Model, request: GenerationRequest, on_delta: DeltaSink | None
    ) -> Generation:
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        sink: Callable[[str], None] | None = None
        if on_delta is not None:
            callback = on_delta

            def sink(text: str) -> None:
                loop.call_soon_threadsafe(callback, text)

        future = loop.run_in_executor(self._executor, self._run, model, request, cancel, sink)
        return await until_stopped(future, cancel)

    # ---- in the model's thread -------------------------------------------------------

    def _run(
        self,
        model: _Model,
        request: GenerationRequest,
        cancel: threading.Event,
        sink: Callable[[str], None] | None,
    ) -> Generation:
        job = self._prepare(request)
        try:
            return self._decode(model, job, cancel, sink, request.spent)
        except RuntimeError as exc:  # llama_decode failed (KV cache full, ...)
            raise InternalProviderError(f"{self._name}: llama.cpp failed: {exc}") from exc

    def _prepare(self, request: GenerationRequest) -> _Job:
        model = self._model  # set: generate holds the lock while this thread runs
        assert model is not None
        fmt = request.response_format
        schema = schema_of(fmt)
        grammar = None
        if fmt is not None and fmt.type == "grammar" and fmt.grammar:
            grammar = self._grammar(model.llm, fmt.grammar)
        elif schema is not None:
            grammar = self._grammar(model.llm, schema_to_gbnf(schema))
            if request.messages is not None:
                request = with_instruction(request, schema)
            else:
                request = replace(
                    request, prompt=f"{schema_instruction(schema)}\n\n{request.prompt or ''}"
                )
        tokens = self._tokens(model, request)
        n_ctx = self._window(model)
        if len(tokens) >= n_ctx:
            raise ContextLengthError(
                f"{self._name}: prompt is {len(tokens)} tokens; the context window is {n_ctx}"
            )
        room = n_ctx - len(tokens)
        seed = _RANDOM_SEED if request.seed is None else request.seed % _RANDOM_SEED
        return _Job(
            tokens=tokens,
            max_tokens=min(request.max_tokens or room, room),
            stop=(*request.stop, *(model.chat.stop_texts if request.messages else ())),
            temperature=0.8 if request.temperature is None else request.temperature,
            top_p=0.95 if request.top_p is None else request.top_p,
            seed=seed,
            grammar=grammar,
            stop_ids=model.chat.stop_ids,
        )

    def _window(self, model: _Model) -> int:
        """A sequence's context window (tokens)."""
        return int(model.llm.n_ctx())  # int: without the `local` extra, llm is Any to mypy

    def _tokens(self, model: _Model, request: GenerationRequest) -> list[int]:
        llm = model.llm
        if request.messages is None:
            return list(llm.tokenize((request.prompt or "").encode(), add_bos=True))
        text = render_chat(model.chat, self._name, request)
        # a template that writes the BOS token itself must not get a second one
        add_bos = not (model.chat.bos_text and text.startswith(model.chat.bos_text))
        return list(llm.tokenize(text.encode(), add_bos=add_bos, special=True))

    def _grammar(self, llm: llama_cpp.Llama, gbnf: str) -> LlamaGrammar:
        key = hashlib.sha256(gbnf.encode()).hexdigest()
        cached = self._grammars.get(key)
        if cached is not None:
            self._grammars.move_to_end(key)
            return cached
        # llama.cpp's own parser: a grammar it rejects would otherwise crash the sampler
        checked = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, gbnf.encode(), b"root")
        if not checked:
            raise BadRequestError(f"{self._name}: the GBNF grammar does not parse")
        llama_cpp.llama_sampler_free(checked)
        token = unmatchable_token(llm, gbnf)
        if token is not None:
            raise BadRequestError(
                f"{self._name}: the GBNF grammar names {token}, a token no output can match "
                "(an end-of-generation token is not named: the output ends where the grammar "
                "is complete)"
            )
        grammar = LlamaGrammar.from_string(gbnf, verbose=False)
        self._grammars[key] = grammar
        if len(self._grammars) > _GRAMMAR_CACHE:
            self._grammars.popitem(last=False)
        return grammar

    def _decode(
        self,
        model: _Model,
        job: _Job,
        cancel: threading.Event,
        sink: Callable[[str], None] | None,
        spent: Spent,
    ) -> Generation:
        """Generate ``job``; ``spent`` counts as it goes (the prompt once evaluated, each
        token produced), so a task cut short still reports what it used."""
        llm = model.llm
        llm.set_seed(job.seed)
        self._prefill(model, job.tokens, cancel)
        spent.input_tokens += len(job.tokens)
        text = TextAssembler(job.stop, sink)
        finish: FinishReason = "length"
        produced = 0
        vocab = llm._model.vocab
        if job.max_tokens > 0 and not cancel.is_set():
            for token in llm.generate(
                job.tokens,
                temp=job.temperature,
                top_p=job.top_p,
                grammar=job.grammar,
                reset=True,
            ):
                if cancel.is_set():
                    finish = "cancelled"
                    break
                if token in job.stop_ids or llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                produced += 1
                spent.output_tokens += 1
                if text.add(self._piece(vocab, token)):
                    finish = "stop"
                    break
                if produced >= job.max_tokens:
                    break
        if cancel.is_set():
            finish = "cancelled"
        usage = Usage(input_tokens=len(job.tokens), output_tokens=produced)
        return Generation(text=text.finish(), finish_reason=finish, usage=usage)

    @staticmethod
    def _piece(vocab: Any, token: int) -> bytes:
        """A token's bytes (llama-cpp-python's own helper pads them to 32 bytes)."""
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, False)
            if n >= 0:
                return buf.raw[:n]
            size = -n  # too small: llama.cpp says how much it needs

    def _prefill(self, model: _Model, tokens: Sequence[int], cancel: threading.Event) -> None:
        """Evaluate all but the last prompt token (``generate`` evaluates that one and samples
        after it) in chunks at fixed offsets, reusing the whole chunks the cache holds from
        the previous prompt, and checking ``cancel`` between chunks.

        A prompt position's KV thus always comes from the same batch, whatever ran before:
        reusing an arbitrary prefix would evaluate the rest in other batches, whose logits
        differ in the last bits, enough to change a greedy pick or a seeded sample."""
        llm = model.llm
        chunk = min(_CHUNK, self._options.n_batch)
        body = list(tokens[:-1])
        common = 0
        for cached, token in zip(model.chunked, body, strict=False):
            if cached != token:
                break
            common += 1
        keep = common // chunk * chunk
        model.chunked = []
        if keep and llm._ctx.kv_cache_seq_rm(-1, keep, -1):
            llm.n_tokens = keep
        else:
            keep = 0
            # unannotated in llama-cpp-python; without the `local` extra there is nothing to
            # ignore, hence unused-ignore too
            llm.reset()  # type: ignore[no-untyped-call,unused-ignore]
        model.chunked = body[:keep]
        for start in range(keep, len(body), chunk):
            if cancel.is_set():
                return
            piece = body[start : start + chunk]
            llm.eval(piece)
            if len(piece) == chunk:
                model.chunked = body[: start + chunk]


async def until_stopped(future: asyncio.Future[Generation], cancel: threading.Event) -> Generation:
    """The generation ``future`` runs in the model's thread. Cancelled, set ``cancel`` (the
    thread stops at its next token or step) and return only once it has, so that the model is
    idle when the caller lets the next task in; then cancelled."""
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        while not future.done():
            try:
                await asyncio.wait({future})
            except asyncio.CancelledError:
                continue
        if not future.cancelled():
            future.exception()  # retrieved: an error after the cancel is of no interest
        raise
