"""Fixtures of the provider tests: local wire-protocol servers, and a tiny GGUF model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.providers.wire import FakeServer, fake_server


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    async with fake_server() as s:
        yield s


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight LLaMA GGUF with a real tokenizer, written once per session."""
    pytest.importorskip("gguf")
    from tests.providers.tinygguf import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
