"""Usage is reported for every outcome that used tokens, not only for completed ones: a cancelled
or expired generation reports what it produced until it stopped, a schema-invalid one what
both of its attempts used."""

from __future__ import annotations

from redis.asyncio import Redis

from sop_llm.providers.configured import ConfiguredProvider
from sop_llm.providers.echo import EchoProvider
from sop_llm.providers.registry import ModelRegistry
from sop_llm.schemas.errors import ErrorCode
from sop_llm.schemas.models import ModelSpec
from sop_llm.schemas.result import TaskState, Usage
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.conftest import wait_for
from tests.fakes import ScriptedProvider
from tests.harness import running_worker

PROMPT = "one two three four five"
PERSON = {
    "type": "json_schema",
    "json_schema": {
        "name": "person",
        "schema": {
            "type": "object",
            "properties": {"name": {"type": "string"}},
            "required": ["name"],
        },
    },
}


NEVER_JSON = ScriptedProvider(["this is not json at all"])


def _registry() -> ModelRegistry:
    registry = ModelRegistry()
    registry.register("slow", EchoProvider(tokens_per_s=20))  # 50 ms a token
    spec = ModelSpec(name="strict", provider="echo")
    registry.register("strict", ConfiguredProvider(inner=NEVER_JSON, spec=spec))
    return registry


async def test_a_cancelled_generation_reports_what_it_produced(client: Redis, keys: Keys) -> None:
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    async with running_worker(client, keys, registry=_registry()):
        task_id = await p.submit("slow", PROMPT, max_tokens=400, stream=True)
        n = 0
        async for _ in p.stream(task_id):
            n += 1
            if n == 5:
                break
        await p.cancel(task_id)
        result = await p.wait(task_id, timeout=10)
    assert result.state == TaskState.CANCELLED
    assert result.usage is not None
    assert result.usage.input_tokens == 5
    assert 5 <= (result.usage.output_tokens or 0) < 400
    assert result.usage.output_tokens == len((result.text or "").split())


async def test_an_expired_generation_reports_what_it_produced(client: Redis, keys: Keys) -> None:
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    async with running_worker(client, keys, registry=_registry()):
        task_id = await p.submit("slow", PROMPT, max_tokens=400, timeout_s=0.5)
        result = await p.wait(task_id, timeout=10)
    assert result.state == TaskState.EXPIRED
    assert result.usage is not None and result.usage.input_tokens == 5
    assert 2 <= (result.usage.output_tokens or 0) < 400


async def test_a_schema_invalid_answer_reports_both_attempts(client: Redis, keys: Keys) -> None:
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    async with running_worker(client, keys, registry=_registry()):
        task_id = await p.submit("strict", "who?", response_format=PERSON)
        result = await p.wait(task_id, timeout=10)
    assert result.state == TaskState.FAILED
    assert result.error is not None and result.error.code == ErrorCode.SCHEMA_INVALID
    # both attempts: the prompt and then the repair request in, the answer twice out
    [first, repair] = NEVER_JSON.requests[-2:]
    asked = len(first.words_source().split()) + len(repair.words_source().split())
    assert result.usage == Usage(input_tokens=asked, output_tokens=2 * 6)


async def test_nothing_generated_reports_no_usage(client: Redis, keys: Keys) -> None:
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    async with running_worker(client, keys, registry=_registry(), slots=1):
        busy = await p.submit("slow", PROMPT, max_tokens=40)
        await wait_for(lambda: _running(p, busy), 5)
        queued = await p.submit("slow", PROMPT, max_tokens=40)
        await p.cancel(queued)  # cancelled before it ran
        result = await p.wait(queued, timeout=10)
        await p.cancel(busy)
        await p.wait(busy, timeout=10)
    assert result.state == TaskState.CANCELLED
    assert result.usage is None


async def _running(p: Producer, task_id: str) -> bool:
    record = await p.status(task_id)
    return record is not None and record.state == TaskState.RUNNING
