"""`sop-llm inspect` against a real Redis: partitions, consumers and their leases, dead letters,
retries, webhooks and models."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from sop_llm.ops.cli import inspect
from sop_llm.ops.settings import Settings
from sop_llm.providers.echo import EchoProvider
from sop_llm.streams.keys import TASK_GROUP, Keys
from tests.harness import echo_registry, running_worker, wait_results, xadd_task


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sop-llm")
    inspect.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["inspect", *argv])


async def inspect_json(settings: Settings, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert await inspect.run(settings, parse("--json")) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


def by_consumer(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["consumer"]: c for c in report["consumers"]}


async def test_inspect_shows_consumers_with_lease_state(
    client: Redis, keys: Keys, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # the inspected fleet serves two pools; the worker below only "default"
    settings = Settings(redis_url=SecretStr(redis_url), namespace=keys.namespace,
                        pools=("default", "other"))  # fmt: skip
    await xadd_task(client, keys, {"task_id": "bad", "model": "nope", "prompt": "x"})
    ghost_stream = keys.tasks("other", "normal")
    await client.xadd(ghost_stream, {"type": "task.submitted", "data": "{}"})
    await client.xgroup_create(ghost_stream, TASK_GROUP, id="0")
    # a consumer that took an entry and has no lease: what a crashed worker leaves behind
    await client.xreadgroup(TASK_GROUP, "w-ghost", {ghost_stream: ">"}, count=1)
    await client.hset(keys.models, mapping={"qwen": "{}", "__version__": "3"})

    async with running_worker(client, keys, consumer="w-live", lease_ttl_ms=5_000):
        await wait_results(client, keys, 1)
        report = await inspect_json(settings, capsys)
        consumers = by_consumer(report)
        live, ghost = consumers["w-live"], consumers["w-ghost"]
        assert live["group"] == TASK_GROUP and live["lease_alive"] is True
        assert 0 < live["lease_ttl_ms"] <= 5_000 and live["pending"] == 0
        assert ghost["lease_alive"] is False and ghost["lease_ttl_ms"] is None
        assert ghost["pending"] == 1

        assert await inspect.run(settings, parse()) == 0
        screen = capsys.readouterr().out.splitlines()

    rows = {p["stream"]: p for p in report["partitions"]}
    assert rows[ghost_stream]["pending"] == 1 and rows[ghost_stream]["lag"] == 0
    assert rows[ghost_stream]["oldest_pending_age_ms"] >= 0
    assert rows[keys.tasks("default", "normal")]["length"] == 1
    assert report["dead"]["length"] == 1
    [newest] = report["dead"]["newest"]
    assert newest["task_id"] == "bad" and newest["reason"] == "model_not_found"
    assert report["models"] == ["echo", "qwen"]
    assert report["served"] == {"echo": ["w-live"]}  # from the live worker's lease
    assert report["results"] == {"length": 1}
    assert report["webhooks"] == {"length": 0, "pending": 0, "lag": None, "delayed": 0, "dead": 0}

    header = next(line for line in screen if line.startswith("GROUP"))
    table = screen[screen.index(header) : screen.index(header) + 3]
    assert [line.split()[1] for line in table[1:]] == ["w-ghost", "w-live"]
    assert table[1].split()[4] == "expired" and table[2].split()[4] == "alive"
    # right-aligned numeric columns end where their header ends
    end = header.index("PENDING") + len("PENDING")
    assert all(line[end - 1].isdigit() and line[end] == " " for line in table[1:])
    assert any(line.startswith("other/normal") for line in screen)
    assert "model_not_found" in "\n".join(screen)
    assert screen[-1] == "models         echo (1 worker), qwen (no live worker)"

    # the worker released its lease when it stopped
    await client.zadd(keys.tasks_delayed, {"retry-member": int(time.time() * 1000) + 60_000})
    report = await inspect_json(settings, capsys)
    assert by_consumer(report)["w-live"]["lease_alive"] is False
    assert report["retries"]["waiting"] == 1
    assert 0 < report["retries"]["next_due_in_ms"] <= 60_000


async def test_inspect_of_an_empty_namespace(
    keys: Keys, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(redis_url=SecretStr(redis_url), namespace=keys.namespace)
    report = await inspect_json(settings, capsys)
    assert report["consumers"] == [] and report["models"] == ["echo"]
    assert [p["length"] for p in report["partitions"]] == [0, 0, 0]
    assert report["dead"] == {"length": 0, "newest": []}
    assert await inspect.run(settings, parse()) == 0
    assert "(no consumers)" in capsys.readouterr().out


def test_ages_read_well() -> None:
    assert [inspect.age(v) for v in (None, 850, 12_340, 245_000, 7_380_000, 273_600_000)] == [
        "-", "850ms", "12.3s", "4m05s", "2h03m", "3d04h",
    ]  # fmt: skip


async def test_inspect_lists_the_models_workers_serve_from_their_files(
    client: Redis, keys: Keys, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model declared in a worker's models file is in no Redis registry: the live worker's
    lease names it, so `inspect` shows it with the worker that serves it."""
    settings = Settings(redis_url=SecretStr(redis_url), namespace=keys.namespace)
    registry = echo_registry()
    registry.register("from-file", EchoProvider())
    async with running_worker(client, keys, registry=registry, consumer="w-file"):
        report = await inspect_json(settings, capsys)
    assert report["models"] == ["echo", "from-file"]
    assert report["served"] == {"echo": ["w-file"], "from-file": ["w-file"]}
