"""Model specs from a TOML settings file (``SOP_MODELS_FILE``).

The file holds one table per model under ``models``; the table's key is the model name::

    [models.gpt-mini]
    provider = "openai"
    model_id = "gpt-4o-mini"
    api_key_env = "OPENAI_API_KEY"
    concurrency = 32

    [models."qwen2.5-7b"]
    provider = "llama_cpp"
    path = "/models/qwen2.5-7b-instruct-q4_k_m.gguf"
    context_window = 8192
    n_gpu_layers = -1
    defaults = { temperature = 0.2, max_tokens = 512 }
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sop_llm.providers.factory import ModelConfigError
from sop_llm.schemas.models import ModelSpec, describe_spec_error


def parse_specs(doc: Mapping[str, Any], *, source: str = "models file") -> list[ModelSpec]:
    """Specs from a parsed document. Raises :class:`ModelConfigError` naming every bad entry."""
    unknown = set(doc) - {"models"}
    if unknown:
        raise ModelConfigError(f"{source}: unknown top-level keys: {', '.join(sorted(unknown))}")
    tables = doc.get("models", {})
    if not isinstance(tables, Mapping):
        raise ModelConfigError(f"{source}: 'models' must be a table of model tables")
    specs: list[ModelSpec] = []
    problems: list[str] = []
    for name, table in tables.items():
        if not isinstance(table, Mapping):
            problems.append(f"models.{name}: must be a table")
            continue
        if "name" in table and table["name"] != name:
            problems.append(f"models.{name}: name {table['name']!r} differs from the table key")
            continue
        try:
            specs.append(ModelSpec.model_validate({**table, "name": name}))
        except ValidationError as exc:
            problems.append(f"models.{name}: {describe_spec_error(exc)}")
    if problems:
        raise ModelConfigError(f"{source}: " + "; ".join(problems))
    return specs


def load_specs_file(path: str | Path) -> list[ModelSpec]:
    """Specs declared in the TOML file at ``path``. Raises :class:`ModelConfigError` for a
    missing or unreadable file, bad TOML, or an invalid spec."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise ModelConfigError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ModelConfigError(f"{p}: invalid TOML: {exc}") from exc
    return parse_specs(doc, source=str(p))


def merge_specs(*layers: list[ModelSpec] | tuple[ModelSpec, ...]) -> list[ModelSpec]:
    """Specs by name, a later layer replacing an earlier one (file specs, then runtime ones:
    a model registered at run time overrides the file's model of the same name)."""
    merged: dict[str, ModelSpec] = {}
    for layer in layers:
        for spec in layer:
            merged[spec.name] = spec
    return list(merged.values())
