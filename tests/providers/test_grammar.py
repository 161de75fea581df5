"""JSON Schema -> GBNF: exact integer ranges, and grammars llama.cpp's parser accepts."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sop_llm.providers.errors import BadRequestError
from sop_llm.providers.grammar import int_bounds, int_range, literal, schema_to_gbnf


def as_regex(expr: str) -> re.Pattern[str]:
    """The integer-range expressions use only literals of digits or "-", classes, groups,
    alternation and {n}: as a regex they are the same text without quotes and spaces."""
    return re.compile(expr.replace('"', "").replace(" ", ""))


def accepts(expr: str, n: int) -> bool:
    return as_regex(expr).fullmatch(str(n)) is not None


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(0, 120), (18, 99), (-5, 5), (-37, 1234), (7, 7), (-120, -3), (0, 0), (100, 1000), (9, 10)],
)
def test_integer_ranges_are_exact(lo: int, hi: int) -> None:
    expr = int_range(lo, hi)
    for n in range(-1500, 1500):
        assert accepts(expr, n) == (lo <= n <= hi), n


@given(st.integers(-(10**6), 10**6), st.integers(0, 10**6), st.integers(-(10**7), 10**7))
def test_integer_ranges_hold_for_any_bounds(lo: int, width: int, probe: int) -> None:
    hi = lo + width
    expr = int_range(lo, hi)
    for n in (lo, hi, lo - 1, hi + 1, probe, (lo + hi) // 2):
        assert accepts(expr, n) == (lo <= n <= hi)


def test_open_ranges_and_no_leading_zeros() -> None:
    expr = int_range(0, None)
    assert accepts(expr, 0) and accepts(expr, 10**14) and not accepts(expr, -1)
    assert not as_regex(expr).fullmatch("007")
    assert not accepts(int_range(None, -1), 0) and accepts(int_range(None, -1), -(10**14))


def test_exclusive_bounds_draft_4_and_later() -> None:
    assert int_bounds({"minimum": 0, "maximum": 10}) == (0, 10)
    assert int_bounds({"exclusiveMinimum": 0, "exclusiveMaximum": 10}) == (1, 9)
    assert int_bounds({"minimum": 0, "exclusiveMinimum": True, "maximum": 10}) == (1, 10)
    assert int_bounds({"minimum": 0.5, "maximum": 9.5}) == (1, 9)


def test_an_empty_range_is_a_bad_request() -> None:
    with pytest.raises(BadRequestError):
        schema_to_gbnf({"type": "integer", "minimum": 5, "maximum": 4})


def test_strings_exclude_control_characters() -> None:
    gbnf = schema_to_gbnf({"type": "string"})
    assert r"\x00-\x1F" in gbnf and "char*" in gbnf
    bounded = schema_to_gbnf({"type": "string", "minLength": 2, "maxLength": 5})
    assert "char{2,5}" in bounded


def test_literals_escape_quotes_and_control_characters() -> None:
    assert literal('a"b\\c\n') == '"a\\"b\\\\c\\x0A"'


SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"a": {"type": "string"}}},
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}}},
    {"type": "array", "items": {"type": "number", "minimum": 0}, "minItems": 1, "maxItems": 4},
    {"type": "array", "prefixItems": [{"type": "string"}, {"type": "null"}]},
    {"enum": ["red", "green", 3, None]},
    {"const": {"k": [1, 2]}},
    {"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "uuid"}]},
    {"type": ["string", "null"], "maxLength": 3},
    {"type": "object", "additionalProperties": {"type": "integer"}},
    {"type": "object", "properties": {}, "additionalProperties": False},
    {"type": "string", "format": "date-time"},
    {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer", "minimum": -3, "maximum": 3},
                    "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]},
                },
                "required": ["v", "next"],
            }
        },
        "$ref": "#/$defs/node",
    },
    {},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_llama_cpp_parses_every_grammar(schema: dict[str, Any], tiny_gguf: Any) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=64, n_threads=1, verbose=False)
    try:
        sampler = llama_cpp.llama_sampler_init_grammar(
            llm._model.vocab, schema_to_gbnf(schema).encode(), b"root"
        )
        assert sampler, schema_to_gbnf(schema)
        llama_cpp.llama_sampler_free(sampler)
    finally:
        llm.close()


def test_unknown_refs_are_refused() -> None:
    with pytest.raises(BadRequestError, match="ref"):
        schema_to_gbnf({"$ref": "#/$defs/missing"})
    with pytest.raises(BadRequestError, match="ref"):
        schema_to_gbnf({"$ref": "https://example.com/schema.json"})
