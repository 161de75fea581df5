"""The model spec: what a model name means, declared in a TOML file or registered at run time.

A spec names the backend, the backend's own model id, the pool that serves it, how many of its
tasks may run at once (or how many GPU slots it takes), its context window, default sampling
parameters and which of them a task may override. Hosts and keys live only here: a task can
never redirect a model to another host or key. A key is named by its environment variable
(``api_key_env``), never carried in the spec itself.
"""

from __future__ import annotations

import json
from typing import Annotated, Final, Literal

from pydantic import (
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from sop_llm.schemas.task import MODEL_PATTERN, NAME_PATTERN
from sop_llm.schemas.wire import StrictModel

ProviderKind = Literal["echo", "llama_cpp", "openai", "openai_compatible", "anthropic"]
# how an OpenAI-compatible server is asked for structured output
StructuredMode = Literal["json_schema", "json_object", "grammar", "none"]
# the request parameters a task may set; the rest come from the spec's defaults
Overridable = Literal["temperature", "top_p", "max_tokens", "stop", "seed", "response_format"]

ALL_OVERRIDABLE: Final[tuple[Overridable, ...]] = (
    "temperature",
    "top_p",
    "max_tokens",
    "stop",
    "seed",
    "response_format",
)
ENV_NAME_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"

ModelName = Annotated[str, StringConstraints(pattern=MODEL_PATTERN)]
PoolName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]


class SamplingDefaults(StrictModel):
    """Parameters used when a task leaves them out (``None``: the backend's own default)."""

    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    stop: Annotated[list[str], Field(max_length=16)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None


class ModelSpec(StrictModel):
    """One model a worker may serve. Stored as JSON in ``{ns}:models`` (name -> spec)."""

    v: Literal[1] = 1
    name: ModelName
    provider: ProviderKind
    model_id: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = Field(
        default=None, description="the backend's model id (openai, openai_compatible, anthropic)"
    )
    pool: PoolName = "default"
    concurrency: Annotated[int, Field(ge=1, le=4096)] | None = Field(
        default=None, description="tasks of this model at a time per worker"
    )
    gpu_slots: Annotated[int, Field(ge=1, le=1024)] | None = Field(
        default=None,
        description="permits of the GPU semaphore this model's device has (llama_cpp: its "
        "parallel; a local llama-server/vLLM: its parallel slots); unset for remote models",
    )
    gpu_device: Annotated[int, Field(ge=0, le=64)] = 0
    context_window: Annotated[int, Field(ge=16, le=10_000_000)] | None = None
    defaults: SamplingDefaults = SamplingDefaults()
    overridable: tuple[Overridable, ...] = ALL_OVERRIDABLE
    timeout_s: Annotated[float, Field(gt=0.0, le=3600.0)] = Field(
        default=120.0, description="read timeout of one backend request"
    )
    # remote backends
    base_url: Annotated[str, StringConstraints(max_length=2048)] | None = None
    api_key_env: Annotated[str, StringConstraints(pattern=ENV_NAME_PATTERN)] | None = None
    structured_output: StructuredMode | None = Field(
        default=None,
        description="openai_compatible: how the server is asked for structured output",
    )
    # llama_cpp
    path: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = None
    n_gpu_layers: Annotated[int, Field(ge=-1)] = 0
    n_threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    n_batch: Annotated[int, Field(ge=1, le=1 << 20)] = 512
    chat_template: str | None = Field(
        default=None, description="llama_cpp: override of the GGUF file's tokenizer.chat_template"
    )
    parallel: Annotated[int, Field(ge=1, le=64)] = Field(
        default=1,
        description="llama_cpp: sequences decoded together in one context (continuous "
        "batching); the model's concurrency and GPU slots",
    )

    @model_validator(mode="after")
    def _fits_provider(self) -> ModelSpec:
        remote = self.provider in ("openai", "openai_compatible", "anthropic")
        if remote and self.model_id is None:
            raise ValueError(f"model_id is required for provider {self.provider!r}")
        if self.provider == "openai_compatible" and not self.base_url:
            raise ValueError("base_url is required for provider 'openai_compatible'")
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must be an http:// or https:// URL")
        if self.provider == "llama_cpp" and self.path is None:
            raise ValueError("path (the GGUF file) is required for provider 'llama_cpp'")
        if self.provider != "llama_cpp" and self.path is not None:
            raise ValueError("path is only for provider 'llama_cpp'")
        if self.structured_output is not None and self.provider != "openai_compatible":
            raise ValueError("structured_output is only for provider 'openai_compatible'")
        if self.provider != "llama_cpp" and self.parallel != 1:
            raise ValueError("parallel is only for provider 'llama_cpp'")
        if self.provider == "llama_cpp" and (self.concurrency or self.parallel) != self.parallel:
            raise ValueError(
                "an in-process llama_cpp model runs one task at a time per sequence: "
                f"concurrency must equal parallel ({self.parallel}) or be unset"
            )
        if self.provider == "llama_cpp" and (self.gpu_slots or self.parallel) != self.parallel:
            raise ValueError(
                "an in-process llama_cpp model takes one GPU slot per sequence: gpu_slots "
                f"must equal parallel ({self.parallel}) or be unset"
            )
        if self.provider in ("openai", "anthropic") and self.gpu_slots is not None:
            raise ValueError(f"a {self.provider} model never takes a GPU slot")
        if len(set(self.overridable)) != len(self.overridable):
            raise ValueError("overridable lists a parameter twice")
        return self

    @property
    def needs_gpu_slot(self) -> bool:
        return self.provider == "llama_cpp" or self.gpu_slots is not None

    def to_wire(self) -> str:
        """Compact JSON: the version and what differs from the defaults."""
        body = self.model_dump(mode="json", exclude_defaults=True)
        return json.dumps({"v": self.v, **body}, separators=(",", ":"), ensure_ascii=False)


def describe_spec_error(exc: ValidationError) -> str:
    """One line naming every offending field, e.g. ``concurrency: Input should be >= 1``."""
    parts = []
    for err in exc.errors(include_url=False):
        msg = err["msg"].removeprefix("Value error, ")
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
