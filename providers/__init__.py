"""Inference backends behind one ``Provider`` protocol, and the model registry."""

from providers.base import Capabilities, Generation, GenerationRequest, Provider, ProviderError
from providers.echo import EchoProvider
from providers.registry import ModelBinding, ModelRegistry

__all__ = [
    "Capabilities",
    "EchoProvider",
    "Generation",
    "GenerationRequest",
    "ModelBinding",
    "ModelRegistry",
    "Provider",
    "ProviderError",
]
