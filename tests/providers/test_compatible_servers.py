"""What OpenAI-compatible servers get wrong, through the official SDK against a local server
that behaves as llama-cpp-python's ``llama_cpp.server`` does (docs/servers.md): each quirk
ends as one clear outcome, decided by the policy, with one request per attempt."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sop_llm.handlers.policy import Fail, Retry, RetryPolicy
from sop_llm.providers.base import GenerationRequest
from sop_llm.providers.configured import ConfiguredProvider
from sop_llm.providers.errors import IncompleteStreamError, ProviderError
from sop_llm.providers.factory import build_provider
from sop_llm.schemas.errors import ErrorCode
from sop_llm.schemas.models import ModelSpec
from sop_llm.schemas.result import TaskResult, TaskState, Usage
from sop_llm.schemas.task import JsonSchemaSpec, ResponseFormat
from tests.providers.wire import FakeServer, json_reply, oa_chunks, oa_completion, sse_reply

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}},
    "required": ["name"],
}
# llama-cpp-python's server answers a request its pydantic model refuses with HTTP 500 and
# the validation error's text (llama_cpp/server/errors.py: every exception is a 500); its
# response_format knows only "text" and "json_object"
VALIDATION_500 = {
    "error": {
        "message": "[{'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
        "'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema', "
        "'ctx': {'expected': \"'text' or 'json_object'\"}}]",
        "type": "internal_server_error",
        "param": None,
        "code": None,
    }
}


def compatible(server: FakeServer, **spec: Any) -> ConfiguredProvider:
    fields: dict[str, Any] = {
        "name": "local",
        "provider": "openai_compatible",
        "model_id": "qwen",
        "base_url": f"{server.url}/v1",
        "timeout_s": 5.0,
    }
    fields.update(spec)
    return build_provider(ModelSpec.model_validate(fields), env={})


def person() -> ResponseFormat:
    return ResponseFormat(
        type="json_schema", json_schema=JsonSchemaSpec(name="person", schema_=PERSON)
    )


async def failure(p: ConfiguredProvider, request: GenerationRequest, **kw: Any) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        await p.generate(request, **kw)
    return info.value


async def test_a_stream_ended_without_a_finish_reason_is_retried_by_the_policy_only(
    server: FakeServer,
) -> None:
    # the server ends the stream with [DONE] after two pieces: no finish reason, no usage
    server.script(sse_reply(oa_chunks(["Hel", "lo"], finish=None, usage=None), done=True))
    p = compatible(server)
    deltas: list[str] = []
    err = await failure(p, GenerationRequest(model="local", prompt="hi"), on_delta=deltas.append)
    await p.aclose()
    assert isinstance(err, IncompleteStreamError)
    assert err.code == ErrorCode.INTERNAL and err.retryable
    assert "ended without a finish reason after 2 content chunks" in err.message
    assert "concurrency 1" in err.message
    assert deltas == ["Hel", "lo"]  # what came was passed on; the answer was not taken as done
    assert len(server.seen) == 1  # no retry below the policy
    policy = RetryPolicy()
    assert isinstance(policy.decide(err, attempts=1, max_attempts=3), Retry)
    last = policy.decide(err, attempts=3, max_attempts=3)
    assert isinstance(last, Fail) and last.code == ErrorCode.MAX_ATTEMPTS
    assert "without a finish reason" in last.message


async def test_json_schema_refused_with_http_500_is_a_bad_request_naming_structured_output(
    server: FakeServer,
) -> None:
    server.script(json_reply(VALIDATION_500, status=500))
    p = compatible(server, structured_output="json_schema")
    err = await failure(
        p, GenerationRequest(model="local", prompt="who?", response_format=person())
    )
    await p.aclose()
    assert err.code == ErrorCode.BAD_REQUEST and not err.retryable and err.status == 500
    assert "structured_output = json_schema" in err.message
    assert "docs/servers.md" in err.message and "response_format" in err.message
    assert len(server.seen) == 1  # neither retried nor "repaired"
    decision = RetryPolicy().decide(err, attempts=1, max_attempts=3)
    assert decision == Fail(ErrorCode.BAD_REQUEST, err.message, dead_letter=False)


async def test_a_500_that_does_not_blame_the_format_stays_a_retryable_fault(
    server: FakeServer,
) -> None:
    crash = {"error": {"message": "CUDA error: out of memory", "type": "internal_server_error"}}
    server.script(json_reply(crash, status=500))
    p = compatible(server, structured_output="json_schema")
    err = await failure(
        p, GenerationRequest(model="local", prompt="who?", response_format=person())
    )
    await p.aclose()
    assert err.code == ErrorCode.INTERNAL and err.retryable


async def test_a_stream_without_usage_counts_a_token_per_content_chunk(
    server: FakeServer,
) -> None:
    server.script(sse_reply(oa_chunks(["Hel", "lo", " world"], usage=None), done=True))
    p = compatible(server)
    request = GenerationRequest(model="local", prompt="hi")
    gen = await p.generate(request, on_delta=lambda _: None)
    await p.aclose()
    assert gen.text == "Hello world" and gen.finish_reason == "stop"
    # the prompt's tokens are unknown (None, written as null); the output is counted; never 0
    assert (gen.usage.input_tokens, gen.usage.output_tokens) == (None, 3)
    assert request.spent.usage() == Usage(input_tokens=None, output_tokens=3)
    written = TaskResult(task_id="t", state=TaskState.COMPLETED, usage=gen.usage, finished_at=1)
    assert json.loads(written.model_dump_json(exclude_none=True))["usage"] == {
        "input_tokens": None,
        "output_tokens": 3,
    }


async def test_a_plain_reply_without_usage_reports_unknown_counts(server: FakeServer) -> None:
    reply = oa_completion("Hello")
    del reply["usage"]
    server.script(json_reply(reply))
    p = compatible(server)
    request = GenerationRequest(model="local", prompt="hi")
    gen = await p.generate(request)
    await p.aclose()
    assert gen.text == "Hello"
    assert (gen.usage.input_tokens, gen.usage.output_tokens) == (None, None)
    assert gen.usage.total_tokens is None
    assert request.spent.usage() == Usage(input_tokens=None, output_tokens=None)


async def test_a_plain_request_takes_the_usage_of_the_reply(server: FakeServer) -> None:
    server.script(json_reply(oa_completion("Hello", prompt_tokens=9, completion_tokens=4)))
    p = compatible(server)
    request = GenerationRequest(model="local", prompt="hi")
    gen = await p.generate(request)
    await p.aclose()
    assert "stream" not in server.bodies[0]
    assert (gen.usage.input_tokens, gen.usage.output_tokens) == (9, 4)
    assert (request.spent.input_tokens, request.spent.output_tokens) == (9, 4)
