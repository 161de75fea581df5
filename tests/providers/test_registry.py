"""Model specs, the TOML file, and keeping a registry in step with specs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sop_llm.providers.base import GenerationRequest
from sop_llm.providers.configured import ConfiguredProvider
from sop_llm.providers.errors import ProviderError
from sop_llm.providers.factory import ModelConfigError
from sop_llm.providers.loader import ModelLoader, load_registry
from sop_llm.providers.registry import ModelRegistry
from sop_llm.providers.specs import load_specs_file, merge_specs, parse_specs
from sop_llm.schemas.models import ModelSpec
from sop_llm.schemas.task import TaskEvent
from tests.providers.wire import FakeServer, json_reply, oa_completion

ENV = {"KEY_A": "sk-a"}


def spec(**fields: Any) -> ModelSpec:
    fields.setdefault("name", "gpt")
    fields.setdefault("provider", "openai")
    fields.setdefault("model_id", "gpt-test")
    return ModelSpec.model_validate(fields)


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"provider": "openai", "model_id": None}, "model_id is required"),
        ({"provider": "openai_compatible", "model_id": "m"}, "base_url is required"),
        ({"provider": "llama_cpp", "model_id": None}, "path (the GGUF file) is required"),
        ({"base_url": "ftp://x"}, "http:// or https://"),
        ({"api_key_env": "sk-live-123"}, "api_key_env"),
        ({"structured_output": "grammar"}, "only for provider 'openai_compatible'"),
        ({"gpu_slots": 2}, "never takes a GPU slot"),
        ({"provider": "llama_cpp", "path": "/m.gguf", "concurrency": 2}, "one task at a time"),
        ({"api_key": "sk-123"}, "Extra inputs are not permitted"),
        ({"overridable": ["temperature", "base_url"]}, "overridable"),
    ],
)
def test_bad_specs_are_refused(fields: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=error.replace("(", r"\(").replace(")", r"\)")):
        spec(**fields)


def test_a_task_cannot_carry_a_host_or_a_key() -> None:
    for field in ("base_url", "api_key", "api_key_env"):
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            TaskEvent.model_validate({"model": "gpt", "prompt": "hi", field: "x"})


def test_wire_form_round_trips_compactly() -> None:
    s = spec(defaults={"temperature": 0.0}, concurrency=8)
    wire = s.to_wire()
    assert wire.startswith('{"v":1,') and '"pool"' not in wire
    assert ModelSpec.model_validate_json(wire) == s


def test_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        """
[models.gpt-mini]
provider = "openai"
model_id = "gpt-4o-mini"
api_key_env = "OPENAI_API_KEY"
concurrency = 32
defaults = { temperature = 0.0, max_tokens = 256 }

[models."qwen2.5-7b"]
provider = "llama_cpp"
path = "/models/qwen.gguf"
pool = "gpu"
context_window = 8192
overridable = ["max_tokens", "seed"]
"""
    )
    gpt, qwen = load_specs_file(path)
    assert (gpt.name, gpt.concurrency, gpt.defaults.temperature) == ("gpt-mini", 32, 0.0)
    assert (qwen.name, qwen.pool, qwen.needs_gpu_slot) == ("qwen2.5-7b", "gpu", True)
    assert qwen.overridable == ("max_tokens", "seed")


def test_toml_errors_name_every_bad_model(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[models.a]\nprovider = "openai"\n[models.b]\nprovider = "nope"\n')
    with pytest.raises(ModelConfigError) as info:
        load_specs_file(path)
    assert "models.a: model_id is required" in str(info.value)
    assert "models.b: provider" in str(info.value)
    path.write_text("[models.a\n")
    with pytest.raises(ModelConfigError, match="invalid TOML"):
        load_specs_file(path)
    with pytest.raises(ModelConfigError, match="cannot read"):
        load_specs_file(tmp_path / "missing.toml")
    with pytest.raises(ModelConfigError, match="unknown top-level keys: model"):
        parse_specs({"model": {}})


def test_runtime_specs_override_the_file() -> None:
    merged = merge_specs([spec(name="a"), spec(name="b")], [spec(name="b", concurrency=3)])
    assert [(s.name, s.concurrency) for s in merged] == [("a", None), ("b", 3)]


async def test_load_registry_builds_and_reloads(server: FakeServer) -> None:
    url = f"{server.url}/v1"
    specs = [
        spec(name="gpt", base_url=url, api_key_env="KEY_A", concurrency=4),
        spec(name="echo2", provider="echo", model_id=None),
        spec(name="elsewhere", pool="other", base_url=url),
    ]
    registry = ModelRegistry()
    registry, loader = await load_registry(specs, env=ENV, registry=registry, pools=["default"])
    assert registry.names() == ["echo2", "gpt"]  # the other pool's model is not built here
    binding = registry.resolve("gpt")
    assert binding.concurrency == 4 and binding.spec is not None and not binding.needs_gpu_slot
    server.script(json_reply(oa_completion("ok")))
    gen = await binding.provider.generate(GenerationRequest(model="gpt", prompt="hi"))
    assert gen.text == "ok"

    # an unchanged spec is kept, a changed one swapped, a missing one removed
    report = await loader.apply(
        [spec(name="gpt", base_url=url, api_key_env="KEY_A", concurrency=2)]
    )
    assert (report.replaced, report.removed, report.added) == (["gpt"], ["echo2"], [])
    assert registry.names() == ["gpt"] and registry.resolve("gpt").concurrency == 2
    report = await loader.apply(
        [spec(name="gpt", base_url=url, api_key_env="KEY_A", concurrency=2)]
    )
    assert not report.changed

    # a spec that cannot be built is skipped and reported; the old one keeps serving
    report = await loader.apply([spec(name="gpt", base_url=url, api_key_env="MISSING")])
    assert "MISSING is not set" in report.failed["gpt"]
    assert registry.resolve("gpt").concurrency == 2
    await loader.close()
    assert registry.names() == []


async def test_strict_loading_refuses_a_bad_spec() -> None:
    with pytest.raises(ModelConfigError, match="NOPE is not set"):
        await load_registry([spec(api_key_env="NOPE")], env={})


async def test_a_replaced_provider_closes_after_its_tasks(server: FakeServer) -> None:
    url = f"{server.url}/v1"
    registry = ModelRegistry()
    async with ModelLoader(registry=registry, env=ENV, retire_timeout_s=5) as loader:
        await loader.apply([spec(base_url=url, concurrency=2)])
        old = registry.resolve("gpt")
        assert isinstance(old.provider, ConfiguredProvider)
        task = old.in_use()
        task.__enter__()  # a task still running on the old binding
        swap = asyncio.create_task(loader.apply([spec(base_url=url, concurrency=3)]))
        async with asyncio.timeout(5):
            while registry.resolve("gpt") is old:
                await asyncio.sleep(0.01)
        assert registry.resolve("gpt").concurrency == 3  # new tasks already get the new one
        await asyncio.sleep(0.05)
        assert not swap.done()  # the old one waits for its task
        task.__exit__(None, None, None)
        report = await asyncio.wait_for(swap, 5)
        assert report.replaced == ["gpt"]
        # a task that resolved the old binding and only now gets to run is told to retry
        with pytest.raises(ProviderError) as info:
            await old.provider.generate(GenerationRequest(model="gpt", prompt="hi"))
        assert info.value.code == "internal" and info.value.retryable


async def test_a_removed_model_is_forgotten_once_closed(server: FakeServer) -> None:
    """What lets GPU admission (and ``/v1/gpu``) drop a model removed at run time."""
    url = f"{server.url}/v1"
    retired: list[str] = []
    registry = ModelRegistry()
    async with ModelLoader(
        registry=registry, env=ENV, retire_timeout_s=5, on_retire=retired.append
    ) as loader:
        await loader.apply([spec(base_url=url)])
        assert retired == []
        await loader.apply([spec(base_url=url, concurrency=3)])  # replaced: the old one closes
        assert retired == ["gpt"]
        report = await loader.apply([])
        assert report.removed == ["gpt"] and retired == ["gpt", "gpt"]
