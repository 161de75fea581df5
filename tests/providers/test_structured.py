"""Output validation, the repair turn, and Retry-After parsing."""

from __future__ import annotations

import email.utils
import time

import pytest

from sop_llm.providers.base import Generation, GenerationRequest, Spent
from sop_llm.providers.errors import BadRequestError, SchemaInvalidError, parse_retry_after
from sop_llm.providers.structured import (
    check_schema,
    generate_validated,
    validate_output,
    with_instruction,
)
from sop_llm.providers.text import TextAssembler
from sop_llm.schemas.result import Usage
from sop_llm.schemas.task import ChatMessage

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"n": 1}', '{"n": 1}'),
        ('  ```json\n{"n": 1}\n```  ', '{"n": 1}'),
        ('Sure! Here it is: {"n": 1} Hope that helps.', '{"n": 1}'),
    ],
)
def test_valid_output_is_returned_as_bare_json(text: str, expected: str) -> None:
    assert validate_output(text, SCHEMA).text == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"n": "one"}', "at n: 'one' is not of type 'integer'"),
        ("{}", "at (root): 'n' is a required property"),
        ('{"n": 1', "not valid JSON"),
        ('{"s": "a\x01b", "n": 1}', "not valid JSON: Invalid control character"),
    ],
)
def test_invalid_output_has_a_short_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match="^" + reason.replace("(", r"\(").replace(")", r"\)")):
        validate_output(text, SCHEMA)


def test_instruction_joins_an_existing_system_message() -> None:
    request = GenerationRequest(
        model="m", messages=[ChatMessage(role="system", content="Be terse."),
                             ChatMessage(role="user", content="n?")],
    )  # fmt: skip
    shaped = with_instruction(request, SCHEMA)
    assert shaped.messages is not None and len(shaped.messages) == 2
    assert shaped.messages[0].content.startswith("Be terse.\n\nRespond with only a JSON value")


async def test_repair_feeds_the_error_back_once() -> None:
    seen: list[GenerationRequest] = []
    outputs = iter(['{"n": "x"}', '{"n": 2}'])

    async def attempt(request: GenerationRequest, sink: object) -> Generation:
        seen.append(request)
        return Generation(
            text=next(outputs), finish_reason="stop", usage=Usage(input_tokens=3, output_tokens=4)
        )

    gen = await generate_validated(attempt, GenerationRequest(model="m", prompt="n?"), SCHEMA)
    assert gen.text == '{"n": 2}' and gen.usage == Usage(input_tokens=6, output_tokens=8)
    repair = seen[1].messages
    assert repair is not None
    assert [m.role for m in repair] == ["user", "assistant", "user"]
    assert "'x' is not of type 'integer'" in repair[-1].content


async def test_a_second_failure_keeps_the_raw_text() -> None:
    async def attempt(request: GenerationRequest, sink: object) -> Generation:
        return Generation(text="nope", finish_reason="stop")

    with pytest.raises(SchemaInvalidError) as info:
        await generate_validated(attempt, GenerationRequest(model="m", prompt="n?"), SCHEMA)
    assert info.value.raw_text == "nope" and info.value.code == "schema_invalid"


def test_check_schema_refuses_a_broken_schema() -> None:
    check_schema(SCHEMA)
    with pytest.raises(BadRequestError, match=r"response_format\.json_schema"):
        check_schema({"type": 12})


def test_retry_after_forms() -> None:
    assert parse_retry_after({"Retry-After": "12"}) == 12.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    got = parse_retry_after({"Retry-After": future})
    assert got is not None and 25 <= got <= 31
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({"Retry-After": "99999999"}) == 3600.0
    assert parse_retry_after({}) is None


def test_text_assembler_holds_back_a_possible_stop_sequence() -> None:
    sent: list[str] = []
    text = TextAssembler(["END"], sent.append)
    assert not text.add(b"ab") and sent == ["ab"]
    assert not text.add(b"cE") and sent == ["ab", "c"]  # "E" may begin "END"
    assert not text.add(b"Nx") and sent == ["ab", "c", "ENx"]  # it did not
    assert text.add(b"yEN") is False and text.add(b"D tail") is True
    assert text.finish() == "abcENxy" and "".join(sent) == "abcENxy"


def test_text_assembler_waits_for_whole_characters() -> None:
    sent: list[str] = []
    text = TextAssembler([], sent.append)
    euro = "€".encode()
    text.add(euro[:1])
    text.add(euro[1:2])
    assert sent == []
    text.add(euro[2:] + b"\xff")
    assert text.finish() == "€\ufffd" and "".join(sent) == "€\ufffd"


def test_an_unknown_count_stays_unknown_across_attempts() -> None:
    """A repair whose second call reported no usage: the total is unknown, not the first
    call's count passed off as the whole."""
    spent = Spent()
    spent.add(Usage(input_tokens=7, output_tokens=5))
    assert spent.usage() == Usage(input_tokens=7, output_tokens=5)
    spent.add(Usage(input_tokens=None, output_tokens=None))
    assert spent.usage() == Usage(input_tokens=None, output_tokens=None)
    assert Spent().usage() is None  # nothing counted, nothing unknown: no usage at all
    streamed = Spent(input_unknown=True)
    assert streamed.usage(at_least_output=3) == Usage(input_tokens=None, output_tokens=3)
