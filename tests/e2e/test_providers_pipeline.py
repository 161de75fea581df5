"""Providers through the whole pipeline: publish -> worker -> provider -> results and status.

Every test builds its registry from model specs with ``providers.loader.load_registry`` and
runs a real worker (and a real sidecar) against a real Redis in a namespace of its own. The
remote specs point at local servers that speak the OpenAI and Anthropic wire protocols
(``tests/providers/wire.py``); the ``llama_cpp`` spec loads a tiny random-weight GGUF model.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jsonschema
import pytest
from redis.asyncio import Redis

from sop_llm.providers.base import GenerationRequest
from sop_llm.providers.configured import ConfiguredProvider
from sop_llm.schemas.models import ModelSpec, SamplingDefaults
from sop_llm.schemas.result import TaskResult, TaskState, Usage
from sop_llm.streams.control import CancelOutcome
from sop_llm.streams.keys import F_ERRORS, Keys
from tests.conftest import wait_for
from tests.e2e.pipeline_helper import (
    Pipeline,
    by_mode,
    hanging,
    pipeline,
    result_of,
    sse_events,
    timed,
)
from tests.providers.wire import (
    FakeServer,
    Reply,
    an_events,
    an_message,
    fake_server,
    json_reply,
    oa_chunks,
    oa_completion,
    oa_error,
    sse_reply,
)

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": PERSON},
}
# every spec's default temperature: a task's 0 must win over it (0 is not "absent")
DEFAULT_TEMPERATURE = 0.7

RemoteKind = Literal["openai", "openai_compatible", "anthropic"]


@dataclass(frozen=True, slots=True)
class Remote:
    """How one remote backend is declared, and what its server answers."""

    provider: RemoteKind

    def spec(self, server: FakeServer, name: str = "m", **fields: Any) -> ModelSpec:
        body: dict[str, Any] = {
            "name": name,
            "provider": self.provider,
            "model_id": f"{self.provider}-model",
            "timeout_s": 10.0,
            "defaults": {"temperature": DEFAULT_TEMPERATURE},
        }
        if self.provider == "anthropic":
            body.update(base_url=server.url, api_key_env="E2E_ANTHROPIC_KEY")
        elif self.provider == "openai":
            body.update(base_url=f"{server.url}/v1", api_key_env="E2E_OPENAI_KEY")
        else:  # a keyless local server (vLLM, llama-server) asked for any JSON object
            body.update(base_url=f"{server.url}/v1", structured_output="json_object")
        body.update(fields)
        return ModelSpec.model_validate(body)

    @property
    def path(self) -> str:
        return "/v1/messages" if self.provider == "anthropic" else "/v1/chat/completions"

    def completion(self, text: str, usage: tuple[int, int]) -> Reply:
        if self.provider == "anthropic":
            return by_mode(
                plain=json_reply(an_message([{"type": "text", "text": text}], usage=usage)),
                streamed=sse_reply(an_events([("text", _pieces(text))], usage=usage)),
            )
        return by_mode(
            plain=json_reply(
                oa_completion(text, prompt_tokens=usage[0], completion_tokens=usage[1])
            ),
            streamed=sse_reply(oa_chunks(_pieces(text), usage=usage), done=True),
        )

    def structured(self, doc: dict[str, Any], usage: tuple[int, int]) -> Reply:
        if self.provider == "anthropic":  # a forced tool call whose input is the answer
            block = {"type": "tool_use", "id": "toolu_1", "name": "person", "input": doc}
            events = an_events(
                [("tool", _pieces(json.dumps(doc)))], stop="tool_use", usage=usage,
                tool_name="person",
            )  # fmt: skip
            return by_mode(
                plain=json_reply(an_message([block], stop="tool_use", usage=usage)),
                streamed=sse_reply(events),
            )
        return self.completion(json.dumps(doc), usage)

    def stream(self, pieces: list[str], usage: tuple[int, int]) -> Reply:
        # the pause between events lets the worker flush several delta batches
        if self.provider == "anthropic":
            return sse_reply(an_events([("text", pieces)], usage=usage), delay=0.05)
        return sse_reply(oa_chunks(pieces, usage=usage), delay=0.05, done=True)

    def check_structured_request(self, body: dict[str, Any]) -> None:
        """The backend was asked for structured output by its own mechanism."""
        if self.provider == "openai":
            assert body["response_format"] == {
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": PERSON, "strict": True},
            }
        elif self.provider == "openai_compatible":
            assert body["response_format"] == {"type": "json_object"}
            assert "maxLength" in body["messages"][0]["content"]  # the schema in the prompt
        else:
            assert body["tool_choice"] == {"type": "tool", "name": "person"}
            assert body["tools"][0]["input_schema"] == PERSON


def _pieces(text: str, n: int = 3) -> list[str]:
    """``text`` cut into ``n`` consecutive pieces (as a backend streams it)."""
    size = max(1, -(-len(text) // n))
    return [text[i : i + size] for i in range(0, len(text), size)]


REMOTES = [Remote("openai"), Remote("openai_compatible"), Remote("anthropic")]
remote_params = pytest.mark.parametrize("remote", REMOTES, ids=lambda r: r.provider)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from tests.providers.tinygguf import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def tiny_spec(path: Path, name: str = "tiny") -> ModelSpec:
    return ModelSpec(
        name=name,
        provider="llama_cpp",
        path=str(path),
        context_window=1024,
        n_threads=1,
        defaults=SamplingDefaults(temperature=DEFAULT_TEMPERATURE),
    )


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    async with fake_server() as s:
        yield s


async def _completed(pipe: Pipeline, client: Redis, keys: Keys, task_id: str) -> TaskResult:
    """The task's one results entry, checked against its status record: both say completed."""
    result = await result_of(client, keys, task_id)
    assert result.state == TaskState.COMPLETED, result.error
    status = await pipe.producer.status(task_id)
    assert status is not None and status.state == TaskState.COMPLETED
    assert status.result == result
    return result


async def _streamed(pipe: Pipeline, client: Redis, keys: Keys, task_id: str) -> list[str]:
    """The deltas of ``task_id`` read live over SSE from the sidecar, after checking the stream
    ended with a completed task and that a token stream (not the whole-text fallback) was
    written."""
    events = await sse_events(f"{pipe.sidecar_url}/v1/tasks/{task_id}/stream")
    assert events[-1][0] == "end" and events[-1][1]["state"] == "completed", events[-1]
    assert [name for name, _ in events[:-1]] == ["delta"] * (len(events) - 1)
    assert await client.exists(keys.task_tokens(task_id)) == 1
    return [str(data["text"]) for _, data in events[:-1]]


# ---- remote providers ---------------------------------------------------------------------


@remote_params
async def test_remote_completion(
    remote: Remote, server: FakeServer, client: Redis, keys: Keys, redis_url: str
) -> None:
    server.script(remote.completion("The answer is 42.", (11, 6)))
    async with pipeline(client, keys, redis_url, [remote.spec(server)]) as pipe:
        task_id = await pipe.producer.submit("m", "What is the answer?", max_tokens=20)
        result = await _completed(pipe, client, keys, task_id)
    assert result.text == "The answer is 42." and result.finish_reason == "stop"
    assert result.usage == Usage(input_tokens=11, output_tokens=6)
    assert result.model == "m" and result.attempts == 1
    [seen] = server.seen
    assert seen.path == remote.path and seen.body["model"] == f"{remote.provider}-model"
    assert "What is the answer?" in json.dumps(seen.body["messages"])
    if remote.provider == "openai":  # the key from the spec's env var reaches the server
        assert seen.headers["authorization"] == "Bearer sk-e2e-openai"
    elif remote.provider == "anthropic":
        auth = seen.headers.get("x-api-key") or seen.headers.get("authorization", "")
        assert auth.endswith("sk-e2e-ant")


@remote_params
async def test_remote_structured_output(
    remote: Remote, server: FakeServer, client: Redis, keys: Keys, redis_url: str
) -> None:
    server.script(remote.structured({"name": "Ada", "age": 36}, (30, 9)))
    async with pipeline(client, keys, redis_url, [remote.spec(server)]) as pipe:
        task_id = await pipe.producer.submit("m", "Invent a person.", response_format=PERSON_FORMAT)
        result = await _completed(pipe, client, keys, task_id)
    assert result.text is not None
    doc = json.loads(result.text)
    jsonschema.validate(doc, PERSON)
    assert doc == {"name": "Ada", "age": 36}
    assert result.usage == Usage(input_tokens=30, output_tokens=9)
    [seen] = server.seen
    remote.check_structured_request(seen.body)


async def test_invalid_structured_output_is_repaired_once(
    server: FakeServer, client: Redis, keys: Keys, redis_url: str
) -> None:
    remote = Remote("openai_compatible")
    server.script(
        remote.completion('{"name": "Ada"}', (30, 5)),  # "age" is missing
        remote.completion('{"name": "Ada", "age": 36}', (50, 9)),
    )
    async with pipeline(client, keys, redis_url, [remote.spec(server)]) as pipe:
        task_id = await pipe.producer.submit("m", "Invent a person.", response_format=PERSON_FORMAT)
        result = await _completed(pipe, client, keys, task_id)
    assert result.text is not None
    jsonschema.validate(json.loads(result.text), PERSON)
    assert result.attempts == 1  # a repair is part of the attempt, not a retry
    assert result.usage == Usage(input_tokens=80, output_tokens=14)  # both calls counted
    assert len(server.seen) == 2
    repair = json.dumps(server.seen[1].body["messages"])
    assert '{\\"name\\": \\"Ada\\"}' in repair and "age" in repair


@remote_params
async def test_remote_streaming_over_sse(
    remote: Remote, server: FakeServer, client: Redis, keys: Keys, redis_url: str
) -> None:
    pieces = ["Once", " upon", " a", " time", "."]
    server.script(remote.stream(pieces, (6, 5)))
    async with pipeline(client, keys, redis_url, [remote.spec(server)]) as pipe:
        task_id = await pipe.producer.submit("m", "Tell a story.", stream=True)
        deltas, result = await asyncio.gather(
            _streamed(pipe, client, keys, task_id), _completed(pipe, client, keys, task_id)
        )
    assert "".join(deltas) == result.text == "Once upon a time."
    assert len(deltas) >= 2, deltas  # it arrived in pieces, as it was generated
    assert result.usage == Usage(input_tokens=6, output_tokens=5)
    [seen] = server.seen
    assert seen.body["stream"] is True


# ---- llama.cpp (in-process, the tiny random model: no particular text is asserted) --------


async def test_llama_cpp_completion(
    tiny_gguf: Path, client: Redis, keys: Keys, redis_url: str
) -> None:
    async with pipeline(client, keys, redis_url, [tiny_spec(tiny_gguf)]) as pipe:
        task_id = await pipe.producer.submit("tiny", "Hello world", max_tokens=12, seed=1)
        result = await _completed(pipe, client, keys, task_id)
    assert result.text and result.finish_reason in ("length", "stop")
    assert result.usage is not None
    # BOS, the SPM space marker and 11 characters of the tiny model's character vocabulary
    assert result.usage.input_tokens == 13
    assert 1 <= (result.usage.output_tokens or 0) <= 12
    if result.finish_reason == "length":
        assert result.usage.output_tokens == 12
    assert result.attempts == 1


async def test_llama_cpp_structured_output(
    tiny_gguf: Path, client: Redis, keys: Keys, redis_url: str
) -> None:
    async with pipeline(client, keys, redis_url, [tiny_spec(tiny_gguf)]) as pipe:
        ids = [
            await pipe.producer.submit(
                "tiny", "Invent a person.", response_format=PERSON_FORMAT, max_tokens=128, seed=s
            )
            for s in (1, 2, 3)
        ]
        done = [await _completed(pipe, client, keys, t) for t in ids]
    for result in done:
        assert result.text is not None
        jsonschema.validate(json.loads(result.text), PERSON)


async def test_llama_cpp_streaming_over_sse(
    tiny_gguf: Path, client: Redis, keys: Keys, redis_url: str
) -> None:
    async with pipeline(client, keys, redis_url, [tiny_spec(tiny_gguf)]) as pipe:
        task_id = await pipe.producer.submit(
            "tiny", "Hello world", max_tokens=64, seed=5, stream=True
        )
        deltas, result = await asyncio.gather(
            _streamed(pipe, client, keys, task_id), _completed(pipe, client, keys, task_id)
        )
    assert result.text and "".join(deltas) == result.text


# ---- temperature 0 ------------------------------------------------------------------------


async def test_temperature_zero_reaches_every_provider_as_zero(
    tiny_gguf: Path, client: Redis, keys: Keys, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fake_server() as oa, fake_server() as compat, fake_server() as an:
        servers = dict(zip(REMOTES, (oa, compat, an), strict=True))
        specs = [r.spec(s, name=r.provider.replace("_", "-")) for r, s in servers.items()]
        for r, s in servers.items():
            s.script(*(r.completion("ok", (1, 1)) for _ in range(2)))
        async with pipeline(client, keys, redis_url, [*specs, tiny_spec(tiny_gguf)]) as pipe:
            llama_temperatures = _spy_llama_temperature(pipe, "tiny", monkeypatch)
            # the two tasks of one backend may reach it in either order: told apart by prompt
            zero = [
                await pipe.producer.submit(s.name, "Hi zero", temperature=0, max_tokens=8)
                for s in specs
            ]
            absent = [await pipe.producer.submit(s.name, "Hi absent", max_tokens=8) for s in specs]
            # greedy: the seed cannot change the output
            greedy = [
                await pipe.producer.submit(
                    "tiny", "Hello world", temperature=0, seed=seed, max_tokens=24
                )
                for seed in (1, 2)
            ]
            sampled = await pipe.producer.submit("tiny", "Hello world", seed=1, max_tokens=24)
            for task_id in [*zero, *absent, *greedy, sampled]:
                await _completed(pipe, client, keys, task_id)
            greedy_texts = [(await result_of(client, keys, t)).text for t in greedy]
    for s in servers.values():
        assert len(s.seen) == 2
        first = _body_asking(s, "Hi zero")
        second = _body_asking(s, "Hi absent")
        assert "temperature" in first and first["temperature"] == 0  # not dropped, not 0.7
        assert type(first["temperature"]) in (int, float)
        assert second["temperature"] == DEFAULT_TEMPERATURE  # absent: the spec's default
    # whatever order the three ran in: the two greedy ones at 0, the other at the default
    assert collections.Counter(llama_temperatures) == collections.Counter(
        {0.0: 2, DEFAULT_TEMPERATURE: 1}
    )
    assert greedy_texts[0] and greedy_texts[0] == greedy_texts[1]


def _body_asking(server: FakeServer, prompt: str) -> dict[str, Any]:
    """The one request body ``server`` saw whose messages carry ``prompt``."""
    found: list[dict[str, Any]] = [
        seen.body for seen in server.seen if prompt in json.dumps(seen.body.get("messages"))
    ]
    assert len(found) == 1, f"{len(found)} requests carry {prompt!r}"
    return found[0]


def _spy_llama_temperature(
    pipe: Pipeline, model: str, monkeypatch: pytest.MonkeyPatch
) -> list[float]:
    """The temperature each llama.cpp generation of ``model`` is actually sampled with (what
    the adapter hands llama.cpp, after the spec's defaults were applied)."""
    provider = pipe.registry.resolve(model).provider
    assert isinstance(provider, ConfiguredProvider)
    inner: Any = provider.inner
    prepare: Callable[[GenerationRequest], Any] = inner._prepare
    seen: list[float] = []

    def spy(request: GenerationRequest) -> Any:
        job = prepare(request)
        seen.append(job.temperature)
        return job

    monkeypatch.setattr(inner, "_prepare", spy)
    return seen


# ---- retries and isolation ----------------------------------------------------------------


async def test_rate_limit_is_retried_after_retry_after(
    server: FakeServer, client: Redis, keys: Keys, redis_url: str
) -> None:
    hits: list[float] = []
    server.script(
        timed(
            json_reply(
                oa_error("Rate limit reached", type_="rate_limit_error"),
                status=429,
                headers={"Retry-After": "2"},
            ),
            hits,
        ),
        timed(Remote("openai").completion("after the wait", (5, 3)), hits),
    )
    spec = Remote("openai").spec(server)
    async with pipeline(client, keys, redis_url, [spec], retry_poll_ms=50) as pipe:
        task_id = await pipe.producer.submit("m", "Hi")
        result = await _completed(pipe, client, keys, task_id)
        errors = await client.hget(keys.task(task_id), F_ERRORS)
        status = await pipe.producer.status(task_id)
    assert len(hits) == len(server.seen) == 2  # exactly one more call
    gap = hits[1] - hits[0]
    assert 1.8 <= gap <= 4.0, f"retried {gap:.2f} s after the 429 (Retry-After: 2)"
    assert result.text == "after the wait" and result.attempts == 2
    assert status is not None and status.attempts == 2
    assert errors is not None
    [earlier] = json.loads(errors)
    assert earlier["code"] == "rate_limited" and "Rate limit reached" in earlier["message"]


async def test_a_stuck_pool_does_not_block_another_pool(
    client: Redis, keys: Keys, redis_url: str
) -> None:
    """Model ``stuck`` (pool ``slow``) hangs at its backend; model ``healthy`` (pool ``fast``)
    answers at once. With more of ``stuck``'s tasks queued first than the worker has slots in
    all, ``healthy``'s tasks must still finish promptly: each pool has its own slot budget, and
    a stuck pool fills its own, never another's."""
    budget, stuck_tasks, healthy_tasks = 2, 8, 4
    release = asyncio.Event()
    async with fake_server() as slow, fake_server() as fast:
        slow.script(*(hanging(release) for _ in range(stuck_tasks)))
        fast.script(
            *(Remote("openai").completion(f"fast {i}", (1, 2)) for i in range(healthy_tasks))
        )
        specs = [
            Remote("openai").spec(slow, name="stuck", pool="slow", timeout_s=60.0),
            Remote("openai").spec(fast, name="healthy", pool="fast"),
        ]
        try:
            async with pipeline(
                client, keys, redis_url, specs, pools=("slow", "fast"), slots=2 * budget,
                pool_slots={"slow": budget, "fast": budget}, shutdown_grace_s=0.5,
            ) as pipe:  # fmt: skip
                stuck = [
                    await pipe.producer.submit("stuck", f"a{i}", pool="slow")
                    for i in range(stuck_tasks)
                ]
                # the stuck pool has taken every slot it may have
                await wait_for(lambda: len(slow.seen) >= budget, 5)
                began = time.monotonic()
                healthy = [
                    await pipe.producer.submit("healthy", f"b{i}", pool="fast")
                    for i in range(healthy_tasks)
                ]
                try:
                    async with asyncio.timeout(5):
                        done = [await result_of(client, keys, t, 5) for t in healthy]
                except TimeoutError:
                    pytest.fail(
                        f"pool 'fast' got no result within 5 s while pool 'slow' hangs "
                        f"({len(slow.seen)} of {stuck_tasks} stuck tasks at the backend, "
                        f"worker in-flight {pipe.worker.inflight})"
                    )
                elapsed = time.monotonic() - began
                stuck_states = [await pipe.producer.status(t) for t in stuck]
        finally:
            release.set()
    assert elapsed < 5.0
    assert all(r.state == TaskState.COMPLETED for r in done)
    assert sorted(r.text or "" for r in done) == [f"fast {i}" for i in range(healthy_tasks)]
    # the slow pool was stuck the whole time, within its own budget: none of its tasks ended
    assert all(s is not None and not s.state.terminal for s in stuck_states)
    assert len(slow.seen) == budget


async def test_cancel_during_a_real_llama_cpp_generation(
    tiny_gguf: Path, client: Redis, keys: Keys, redis_url: str
) -> None:
    spec = tiny_spec(tiny_gguf).model_copy(update={"context_window": 32768})
    async with pipeline(client, keys, redis_url, [spec]) as pipe:
        # a grammar that admits no end before 20,000 letters: still running when cancelled
        task_id = await pipe.producer.submit(
            "tiny", "Hello", max_tokens=30000, seed=3, stream=True,
            response_format={"type": "grammar", "grammar": "root ::= w{100}\nw ::= [a-z]{200}"},
        )  # fmt: skip
        await wait_for(lambda: client.exists(keys.task_tokens(task_id)), 10)
        assert await pipe.producer.cancel(task_id) == CancelOutcome.REQUESTED
        result = await result_of(client, keys, task_id)
        # the model's only permit was given back: the next task runs
        follow = await pipe.producer.submit("tiny", "again", max_tokens=4, seed=1)
        after = await _completed(pipe, client, keys, follow)
    assert result.state == TaskState.CANCELLED and result.finish_reason == "cancelled"
    assert result.text is not None and 0 < len(result.text) < 20_000  # stopped partway
    assert result.run_ms < 10_000
    assert after.state == TaskState.COMPLETED
