"""Model spec -> provider. The one place a backend adapter is chosen and configured.

Keys are looked up by the spec's ``api_key_env`` in the ``env`` mapping the caller passes (ops
passes ``os.environ``); they go to the SDK client and nowhere else (never logged, never in an
error message). The llama.cpp adapter is imported only when a spec needs it, so a worker
without the ``local`` extra serves remote models.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Final

from sop_llm.providers.base import Provider
from sop_llm.providers.configured import ConfiguredProvider
from sop_llm.providers.echo import EchoProvider
from sop_llm.schemas.errors import SopError
from sop_llm.schemas.models import ModelSpec

# concurrency when a remote spec names none: requests at a time per worker
DEFAULT_REMOTE_CONCURRENCY: Final = 16


class ModelConfigError(SopError):
    """A spec cannot be turned into a provider here (a missing key, file or extra)."""


def api_key(spec: ModelSpec, env: Mapping[str, str]) -> str | None:
    """The spec's key from ``env``. Raises :class:`ModelConfigError` naming the variable
    (never its value) when the spec names one that is unset or empty."""
    if spec.api_key_env is None:
        return None
    value = env.get(spec.api_key_env)
    if not value:
        raise ModelConfigError(
            f"model {spec.name!r}: environment variable {spec.api_key_env} is not set"
        )
    return value


def build_backend(
    spec: ModelSpec, *, env: Mapping[str, str], echo_tokens_per_s: float = 0.0
) -> Provider:
    """The bare adapter for ``spec`` (blocking for ``llama_cpp``: it loads the GGUF file; call
    it in a thread). Raises :class:`ModelConfigError`."""
    concurrency = spec.concurrency or DEFAULT_REMOTE_CONCURRENCY
    # the HTTP pool holds a connection per call the worker may make at once: the model's
    # concurrency (ConfiguredProvider's), no hidden cap below it
    connections = spec.concurrency or spec.gpu_slots or DEFAULT_REMOTE_CONCURRENCY
    if spec.provider == "echo":
        return EchoProvider(tokens_per_s=echo_tokens_per_s, slots=spec.concurrency or 64)
    if spec.provider in ("openai", "openai_compatible"):
        from sop_llm.providers.openai import OPENAI_BASE_URL, OpenAIConfig, OpenAIProvider

        compatible = spec.provider == "openai_compatible"
        mode = spec.structured_output or ("json_schema" if not compatible else "none")
        assert spec.model_id is not None  # the spec validator guarantees it
        return OpenAIProvider(
            name=spec.name,
            config=OpenAIConfig(
                model_id=spec.model_id,
                api_key=api_key(spec, env),
                base_url=spec.base_url or OPENAI_BASE_URL,
                timeout_s=spec.timeout_s,
                structured="prompt" if mode == "none" else mode,
                max_tokens_field="max_tokens" if compatible else "max_completion_tokens",
                concurrency=spec.gpu_slots or concurrency,
                connections=connections,
                compatible=compatible,
            ),
        )
    if spec.provider == "anthropic":
        from sop_llm.providers.anthropic import (
            ANTHROPIC_BASE_URL,
            AnthropicConfig,
            AnthropicProvider,
        )

        assert spec.model_id is not None
        return AnthropicProvider(
            name=spec.name,
            config=AnthropicConfig(
                model_id=spec.model_id,
                api_key=api_key(spec, env),
                base_url=spec.base_url or ANTHROPIC_BASE_URL,
                timeout_s=spec.timeout_s,
                concurrency=concurrency,
                connections=connections,
            ),
        )
    if spec.provider == "llama_cpp":
        if importlib.util.find_spec("llama_cpp") is None:
            raise ModelConfigError(
                f"model {spec.name!r}: llama-cpp-python is not installed (extra 'local')"
            )
        from sop_llm.providers.llama_cpp import LlamaCppProvider, LlamaOptions

        assert spec.path is not None
        options = LlamaOptions(
            path=spec.path,
            n_ctx=spec.context_window or 4096,
            n_gpu_layers=spec.n_gpu_layers,
            n_threads=spec.n_threads,
            n_batch=spec.n_batch,
            chat_template=spec.chat_template,
            parallel=spec.parallel,
        )
        provider_class = LlamaCppProvider
        if spec.parallel > 1:  # continuous batching: N sequences in one context
            from sop_llm.providers.llama_batch import LlamaBatchProvider

            provider_class = LlamaBatchProvider
        try:
            return provider_class.build(name=spec.name, options=options)
        except (OSError, ValueError, RuntimeError) as exc:  # what llama.cpp raises for a bad file
            raise ModelConfigError(f"model {spec.name!r}: cannot load {spec.path}: {exc}") from exc
    raise ModelConfigError(f"model {spec.name!r}: unknown provider {spec.provider!r}")


def build_provider(
    spec: ModelSpec, *, env: Mapping[str, str], echo_tokens_per_s: float = 0.0
) -> ConfiguredProvider:
    """``spec``'s adapter wrapped with its defaults, parameter rules and output validation."""
    inner = build_backend(spec, env=env, echo_tokens_per_s=echo_tokens_per_s)
    return ConfiguredProvider(inner=inner, spec=spec)
