"""OpenTelemetry GenAI semantic-convention attributes for provider spans."""

from __future__ import annotations

import json

from opentelemetry.util.types import AttributeValue

from providers.base import Generation, GenerationRequest


def genai_request_attributes(
    operation: str, provider: str, request: GenerationRequest, content: bool
) -> dict[str, AttributeValue]:
    attrs: dict[str, AttributeValue] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": request.model,
    }
    optional: dict[str, float | int | None] = {
        "gen_ai.request.temperature": request.temperature,
        "gen_ai.request.top_p": request.top_p,
        "gen_ai.request.max_tokens": request.max_tokens,
        "gen_ai.request.seed": request.seed,
    }
    attrs.update({k: v for k, v in optional.items() if v is not None})
    if request.stop:
        attrs["gen_ai.request.stop_sequences"] = list(request.stop)
    if request.response_format is not None:
        attrs["gen_ai.output.type"] = "json" if request.response_format.type != "text" else "text"
    if content:
        # opt-in only (SOP_TRACE_CONTENT): prompts may hold personal data
        if request.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
        else:
            messages = [{"role": "user", "content": request.prompt or ""}]
        attrs["gen_ai.input.messages"] = json.dumps(messages)
    return attrs


def genai_response_attributes(gen: Generation, content: bool) -> dict[str, AttributeValue]:
    attrs: dict[str, AttributeValue] = {
        "gen_ai.usage.input_tokens": gen.usage.input_tokens,
        "gen_ai.usage.output_tokens": gen.usage.output_tokens,
        "gen_ai.response.finish_reasons": [gen.finish_reason],
    }
    if content:
        attrs["gen_ai.output.messages"] = json.dumps([{"role": "assistant", "content": gen.text}])
    return attrs
