"""Inference backends behind one ``Provider`` protocol, the model registry and its loading.

``__all__`` names what a provider author may rely on: the protocol, what it exchanges and the
error tree (a scripted model for tests is in ``sop_llm.testing``). The registry, the loader and
the factory are the worker's internals, imported from their own modules. The SDK adapters
(``providers.openai``, ``providers.anthropic``, ``providers.llama_cpp``) are imported only when
a spec needs them: import them from their modules, not from here.
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

__all__ = [
    "AuthError",
    "BadRequestError",
    "Capabilities",
    "Closeable",
    "ContentFilterError",
    "ContextLengthError",
    "Delta",
    "EchoProvider",
    "Generation",
    "GenerationRequest",
    "InternalProviderError",
    "ModelUnavailableError",
    "OverloadedError",
    "Provider",
    "ProviderError",
    "ProviderTimeoutError",
    "RateLimitedError",
    "SchemaInvalidError",
    "StreamItem",
    "stream",
]
