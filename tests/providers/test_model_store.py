"""Runtime models in Redis, and the ``sop-llm models`` command (real Redis)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from sop_llm.ops.cli.models import register, run_command
from sop_llm.ops.settings import Settings
from sop_llm.schemas.models import ModelSpec
from sop_llm.streams.keys import Keys
from sop_llm.streams.models import VERSION_FIELD, ModelStore


def gpt(**fields: object) -> ModelSpec:
    return ModelSpec.model_validate(
        {"name": "gpt", "provider": "openai", "model_id": "gpt-test", **fields}
    )


async def test_put_list_remove_and_version(client: Redis, keys: Keys) -> None:
    store = ModelStore(client=client, keys=keys)
    assert await store.version() == 0
    assert await store.put(gpt()) == 1
    assert await store.put(gpt(name="claude", provider="anthropic", model_id="c")) == 2
    assert await store.get("gpt") == gpt()
    snap = await store.snapshot()
    assert snap.version == 2 and [s.name for s in snap.specs] == ["claude", "gpt"]
    assert await store.remove("gpt") is True
    assert await store.remove("gpt") is False
    assert await store.version() == 3  # removing nothing does not bump the version
    assert await store.get("gpt") is None


async def test_an_invalid_entry_is_reported_not_fatal(client: Redis, keys: Keys) -> None:
    store = ModelStore(client=client, keys=keys)
    await store.put(gpt())
    await client.hset(keys.models, "broken", '{"name": "broken"}')
    await client.hset(keys.models, "alias", gpt().to_wire())
    snap = await store.snapshot()
    assert [s.name for s in snap.specs] == ["gpt"]
    assert set(snap.invalid) == {"broken", "alias"}


async def test_changes_yield_on_each_version(client: Redis, keys: Keys) -> None:
    store = ModelStore(client=client, keys=keys)
    stop = asyncio.Event()
    seen: list[int] = []

    async def watch() -> None:
        async for snap in store.changes(stop, interval_s=0.02):
            seen.append(len(snap.specs))

    task = asyncio.create_task(watch())
    async with asyncio.timeout(5):
        while seen != [0]:
            await asyncio.sleep(0.01)
        await store.put(gpt())
        while seen != [0, 1]:
            await asyncio.sleep(0.01)
        stop.set()
        await task
    assert await client.hget(keys.models, VERSION_FIELD) == b"1"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["models", *argv])


@pytest.fixture
def settings(redis_url: str, namespace: str) -> Settings:
    return Settings(redis_url=SecretStr(redis_url), namespace=namespace)


async def test_cli_add_list_show_remove(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run_command(
        settings,
        parse("add", "--name", "local", "--provider", "openai_compatible", "--model-id", "qwen",
              "--base-url", "http://10.0.0.5:8000/v1", "--gpu-slots", "4", "--structured-output",
              "grammar", "--temperature", "0", "--stop", "END", "--overridable", "max_tokens,seed"),
    )  # fmt: skip
    assert code == 0 and json.loads(capsys.readouterr().out) == {"added": "local", "version": 1}
    assert await run_command(settings, parse("list")) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["gpu_slots"] == 4 and listed["defaults"] == {"temperature": 0.0, "stop": ["END"]}
    assert listed["overridable"] == ["max_tokens", "seed"]
    assert await run_command(settings, parse("show", "local")) == 0
    assert json.loads(capsys.readouterr().out)["base_url"] == "http://10.0.0.5:8000/v1"
    assert await run_command(settings, parse("remove", "local")) == 0
    assert await run_command(settings, parse("remove", "local")) == 1
    assert "not registered" in capsys.readouterr().err


async def test_cli_spec_json_and_refusals(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = '{"name": "c", "provider": "anthropic", "model_id": "claude", "api_key_env": "K"}'
    assert await run_command(settings, parse("add", "--spec", spec, "--concurrency", "5")) == 0
    capsys.readouterr()
    assert await run_command(settings, parse("show", "c")) == 0
    assert json.loads(capsys.readouterr().out)["concurrency"] == 5
    assert await run_command(settings, parse("add", "--name", "x", "--provider", "openai")) == 1
    assert "model_id is required" in capsys.readouterr().err
    assert await run_command(settings, parse("add", "--spec", "[1]")) == 1


async def test_cli_check_reads_a_file_without_redis(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.toml"
    path.write_text('[models.gpt]\nprovider = "openai"\nmodel_id = "gpt-test"\n')
    no_redis = Settings(redis_url=SecretStr("redis://127.0.0.1:1/0"))
    assert await run_command(no_redis, parse("check", str(path))) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "gpt"
    path.write_text('[models.gpt]\nprovider = "openai"\n')
    assert await run_command(no_redis, parse("check", str(path))) == 1
