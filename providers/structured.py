"""Structured output: the schema a request asks for, validation, and the one repair attempt.

Whatever mechanism a backend uses (a grammar, a native JSON Schema mode, a forced tool call, or
the schema shown in the prompt), its output is validated here with ``jsonschema``. An invalid
output gets one repair attempt, the validation error fed back to the model; a second failure
raises :class:`~providers.errors.SchemaInvalidError` carrying the raw text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from sop_llm.providers.base import DeltaSink, Generation, GenerationRequest, Spent
from sop_llm.providers.errors import BadRequestError, SchemaInvalidError
from sop_llm.schemas.result import Usage
from sop_llm.schemas.task import ChatMessage, ResponseFormat

JsonSchema = Mapping[str, Any]
Attempt = Callable[[GenerationRequest, DeltaSink | None], Awaitable[Generation]]

ANY_OBJECT: JsonSchema = {"type": "object"}

_FENCE = re.compile(r"^\s*```[A-Za-z0-9_-]*\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)
# bound on the error text fed back to the model and put into messages
_MAX_ERROR_CHARS = 500


def schema_of(fmt: ResponseFormat | None) -> JsonSchema | None:
    """The JSON Schema an output must satisfy: the task's, ``{"type": "object"}`` for
    ``json_object``, ``None`` for text and raw grammars (nothing to validate against)."""
    if fmt is None:
        return None
    if fmt.type == "json_schema" and fmt.json_schema is not None:
        return fmt.json_schema.schema_
    if fmt.type == "json_object":
        return ANY_OBJECT
    return None


def check_schema(schema: JsonSchema) -> None:
    """Raises :class:`BadRequestError` when ``schema`` is not a valid JSON Schema."""
    try:
        validator_for(schema).check_schema(dict(schema))
    except SchemaError as exc:
        raise BadRequestError(f"response_format.json_schema: {_short(exc.message)}") from exc


@dataclass(frozen=True, slots=True)
class Checked:
    """A validated output: ``text`` is the JSON itself (code fences or chatter removed)."""

    text: str
    value: Any


def validate_output(text: str, schema: JsonSchema) -> Checked:
    """Parse ``text`` as JSON (tolerating a Markdown code fence or text around one object) and
    validate it. Raises :class:`ValueError` with a short, model-readable reason."""
    candidate = _json_text(text)
    try:
        value = json.loads(candidate)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    validator = validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise ValueError(f"at {where}: {_short(error.message)}")
    return Checked(text=candidate, value=value)


def _json_text(text: str) -> str:
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1).strip()
    if stripped[:1] in ("{", "[") or not stripped:
        return stripped
    # chatter around one object ("Here it is: {...}"): take the outermost braces
    start, end = stripped.find("{"), stripped.rfind("}")
    if 0 <= start < end:
        return stripped[start : end + 1]
    return stripped


def _short(message: str) -> str:
    return message if len(message) <= _MAX_ERROR_CHARS else message[:_MAX_ERROR_CHARS] + "..."


def schema_instruction(schema: JsonSchema) -> str:
    """The sentence that shows the model the schema it must follow."""
    shown = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    return (
        "Respond with only a JSON value (no prose, no code fence) that conforms to this "
        f"JSON Schema:\n{shown}"
    )


def as_messages(request: GenerationRequest) -> list[ChatMessage]:
    if request.messages is not None:
        return list(request.messages)
    return [ChatMessage(role="user", content=request.prompt or "")]


def with_instruction(request: GenerationRequest, schema: JsonSchema) -> GenerationRequest:
    """``request`` with the schema instruction added as (or to) the leading system message."""
    note = schema_instruction(schema)
    messages = as_messages(request)
    if messages and messages[0].role == "system":
        first = ChatMessage(role="system", content=f"{messages[0].content}\n\n{note}")
        messages = [first, *messages[1:]]
    else:
        messages = [ChatMessage(role="system", content=note), *messages]
    return replace(request, prompt=None, messages=messages)


def repair_request(request: GenerationRequest, bad_text: str, reason: str) -> GenerationRequest:
    """The follow-up turn: the invalid output, then what was wrong with it."""
    messages = [
        *as_messages(request),
        ChatMessage(role="assistant", content=bad_text),
        ChatMessage(
            role="user",
            content=(
                f"That output is invalid ({reason}). Reply again with only the corrected JSON, "
                "conforming to the schema."
            ),
        ),
    ]
    return replace(request, prompt=None, messages=messages)


def _sum(a: Usage, b: Usage) -> Usage:
    spent = Spent()
    spent.add(a)
    spent.add(b)
    return spent.usage() or Usage()


async def generate_validated(
    attempt: Attempt,
    request: GenerationRequest,
    schema: JsonSchema,
    *,
    on_delta: DeltaSink | None = None,
) -> Generation:
    """Run ``attempt`` and validate its output; on failure run one repair attempt.

    The first attempt streams to ``on_delta``; the repair does not (text already streamed
    cannot be taken back: the final result's ``text`` is authoritative). Usage adds up both
    attempts. Raises :class:`SchemaInvalidError` (``raw_text``: the last output) when the
    repair is invalid too, and whatever ``attempt`` raises.
    """
    first = await attempt(request, on_delta)
    try:
        checked = validate_output(first.text, schema)
    except ValueError as exc:
        reason = str(exc)
    else:
        return replace(first, text=checked.text)
    second = await attempt(repair_request(request, first.text, reason), None)
    usage = _sum(first.usage, second.usage)
    try:
        checked = validate_output(second.text, schema)
    except ValueError as exc:
        raise SchemaInvalidError(
            f"output does not match the JSON Schema after one repair attempt: {exc}",
            raw_text=second.text,
        ) from exc
    return Generation(text=checked.text, finish_reason=second.finish_reason, usage=usage)
