"""Measure how many constrained outputs of the tiny random model validate.

Compares llama-cpp-python's own JSON-Schema-to-GBNF conversion (``before``) with ours, with
and without the validation/repair step (``after``), over the same seeds, prompt and schema:

    python -m tests.providers.measure_structured --seeds 50

A random-weight model is the worst case a grammar can face: it has no idea what JSON is, so
every constraint the grammar leaves out is violated sooner or later.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
from llama_cpp import Llama
from llama_cpp.llama_grammar import LlamaGrammar

from sop_llm.providers.base import GenerationRequest
from sop_llm.providers.errors import ProviderError
from sop_llm.providers.factory import build_provider
from sop_llm.providers.structured import schema_instruction, validate_output
from sop_llm.schemas.models import ModelSpec
from sop_llm.schemas.task import JsonSchemaSpec, ResponseFormat
from tests.providers.tinygguf import write_tiny_gguf

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "city": {"type": "string"},
        "score": {"type": "integer", "minimum": -5, "maximum": 5},
    },
    "required": ["name", "age", "city", "score"],
    "additionalProperties": False,
}
PROMPT = "Describe a person."


def strictly_valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)  # strict JSON: no raw control characters
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def before(path: Path, seeds: range, max_tokens: int) -> int:
    """llama-cpp-python 0.3.36's converter, its create_completion, no validation step."""
    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=1, verbose=False)
    grammar = LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)
    prompt = f"{schema_instruction(SCHEMA)}\n\n{PROMPT}"
    ok = 0
    for seed in seeds:
        out = llm.create_completion(prompt, max_tokens=max_tokens, seed=seed, grammar=grammar)
        ok += strictly_valid(out["choices"][0]["text"])  # type: ignore[index, unused-ignore]
    llm.close()
    return ok


async def after(path: Path, seeds: range, max_tokens: int, *, repair: bool) -> int:
    spec = ModelSpec(
        name="tiny", provider="llama_cpp", path=str(path), context_window=2048, n_threads=1
    )
    provider = build_provider(spec, env={})
    fmt = ResponseFormat(type="json_schema", json_schema=JsonSchemaSpec(schema_=SCHEMA))
    ok = 0
    for seed in seeds:
        request = GenerationRequest(
            model="tiny", prompt=PROMPT, max_tokens=max_tokens, seed=seed, response_format=fmt
        )
        try:
            if repair:
                gen = await provider.generate(request)
            else:  # one attempt, no repair: what the grammar alone achieves
                gen = await provider.inner.generate(request)
                validate_output(gen.text, SCHEMA)
        except (ProviderError, ValueError):
            continue
        ok += strictly_valid(gen.text)
    await provider.aclose()
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--bounded", action="store_true", help="give every string a maxLength (no truncation)"
    )
    args = parser.parse_args(argv)
    if args.bounded:
        SCHEMA["properties"]["city"]["maxLength"] = 24
    seeds = range(args.seeds)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_gguf(Path(tmp) / "tiny.gguf")
        results = {
            "before (llama-cpp-python converter)": before(path, seeds, args.max_tokens),
            "after, grammar only": asyncio.run(after(path, seeds, args.max_tokens, repair=False)),
            "after, grammar + validation/repair": asyncio.run(
                after(path, seeds, args.max_tokens, repair=True)
            ),
        }
    for label, ok in results.items():
        sys.stdout.write(f"{label}: {ok}/{args.seeds} valid ({ok / args.seeds:.0%})\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
