"""Inference backends behind one ``Provider`` protocol, the model registry and its loading.

The SDK adapters (``providers.openai``, ``providers.anthropic``, ``providers.llama_cpp``) are
imported only when a spec needs them: import them from their modules, not from here.
"""

from sop_llm.providers.base import (
    Capabilities,
    Closeable,
    Delta,
    Generation,
    GenerationRequest,
    Provider,
    StreamItem,
    stream,
)
from sop_llm.providers.configured import ConfiguredProvider
from sop_llm.providers.echo import EchoProvider
from sop_llm.providers.errors import (
    AuthError,
    BadRequestError,
    ContentFilterError,
    ContextLengthError,
    InternalProviderError,
    ModelUnavailableError,
    OverloadedError,
    ProviderError,
    ProviderTimeoutError,
    RateLimitedError,
    SchemaInvalidError,
)
from sop_llm.providers.factory import ModelConfigError, build_provider
from sop_llm.providers.loader import LoadReport, ModelLoader, load_registry
from sop_llm.providers.registry import ModelBinding, ModelRegistry
from sop_llm.providers.specs import load_specs_file, merge_specs

__all__ = [
    "AuthError",
    "BadRequestError",
    "Capabilities",
    "Closeable",
    "ConfiguredProvider",
    "ContentFilterError",
    "ContextLengthError",
    "Delta",
    "EchoProvider",
    "Generation",
    "GenerationRequest",
    "InternalProviderError",
    "LoadReport",
    "ModelBinding",
    "ModelConfigError",
    "ModelLoader",
    "ModelRegistry",
    "ModelUnavailableError",
    "OverloadedError",
    "Provider",
    "ProviderError",
    "ProviderTimeoutError",
    "RateLimitedError",
    "SchemaInvalidError",
    "StreamItem",
    "build_provider",
    "load_registry",
    "load_specs_file",
    "merge_specs",
    "stream",
]
