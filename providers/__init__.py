"""Inference backends behind one ``Provider`` protocol, the model registry and its loading.

The SDK adapters (``providers.openai``, ``providers.anthropic``, ``providers.llama_cpp``) are
imported only when a spec needs them: import them from their modules, not from here.
"""

from providers.base import (
    Capabilities,
    Closeable,
    Delta,
    Generation,
    GenerationRequest,
    Provider,
    StreamItem,
    stream,
)
from providers.configured import ConfiguredProvider
from providers.echo import EchoProvider
from providers.errors import (
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
from providers.factory import ModelConfigError, build_provider
from providers.loader import LoadReport, ModelLoader, load_registry
from providers.registry import ModelBinding, ModelRegistry
from providers.specs import load_specs_file, merge_specs

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
