"""`sop-llm models add --wait` against real worker processes: it returns once they serve the
model, so a task submitted right after it runs; a model a worker cannot load, or a worker that
does not answer in time, is an error (exit 1) naming the workers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from sop_llm.ops.cli.models import register, run_command
from sop_llm.ops.settings import Settings
from sop_llm.schemas.result import TaskState
from sop_llm.streams.keys import Keys
from sop_llm.streams.models import worker_models
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.conftest import spawn_cli, terminating, wait_for, worker_env


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sop-llm")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["models", *argv])


async def test_add_wait_returns_once_the_workers_serve_the_model(
    client: Redis,
    redis_url: str,
    namespace: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = Settings(redis_url=SecretStr(redis_url), namespace=namespace)
    keys = Keys(namespace)
    # workers look for new models every 2 s: what --wait waits for
    env = worker_env(redis_url, namespace, models_poll_s=2, block_ms=200)
    with (
        terminating(spawn_cli(["worker"], env, tmp_path / "a.log")),
        terminating(spawn_cli(["worker"], env, tmp_path / "b.log")),
    ):
        await wait_for(lambda: _workers(client, keys, 2), 30)
        add = parse("add", "--name", "fresh", "--provider", "echo", "--wait", "20")
        assert await run_command(settings, add) == 0
        done = json.loads(capsys.readouterr().out)
        assert done["added"] == "fresh" and len(done["serving"]) == 2 and done["refused"] == []
        p = Producer(ProducerConfig(namespace=namespace), client=client)
        task_id = await p.submit("fresh", "right after the add", max_tokens=4)
        result = await p.wait(task_id, timeout=10)
        assert result.state == TaskState.COMPLETED

        # a model the workers cannot load: they take the change and refuse it
        bad = parse("add", "--name", "broken", "--provider", "llama_cpp",
                    "--path", str(tmp_path / "missing.gguf"), "--wait", "20")  # fmt: skip
        assert await run_command(settings, bad) == 1
        captured = capsys.readouterr()
        assert len(json.loads(captured.out)["refused"]) == 2
        assert "did not load on " in captured.err and "(see their logs)" in captured.err

        remove = parse("remove", "fresh", "--wait", "20")
        assert await run_command(settings, remove) == 0
        gone = json.loads(capsys.readouterr().out)
        assert gone["removed"] == "fresh" and gone["serving"] == []


async def test_add_wait_names_the_workers_that_did_not_answer_in_time(
    client: Redis,
    redis_url: str,
    namespace: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = Settings(redis_url=SecretStr(redis_url), namespace=namespace)
    keys = Keys(namespace)
    env = worker_env(redis_url, namespace, models_poll_s=60, block_ms=200)  # slow to look
    with terminating(spawn_cli(["worker"], env, tmp_path / "w.log")):
        await wait_for(lambda: _workers(client, keys, 1), 30)
        [worker] = [w.consumer for w in await worker_models(client, keys) if w.version >= 0]
        add = parse("add", "--name", "later", "--provider", "echo", "--wait", "1")
        assert await run_command(settings, add) == 1
    err = capsys.readouterr().err
    assert "have not taken the change within 1 s" in err
    assert worker in err


async def _workers(client: Redis, keys: Keys, n: int) -> bool:
    return len([w for w in await worker_models(client, keys) if w.version >= 0]) == n


async def test_add_wait_with_no_live_worker_returns_at_once_and_says_so(
    redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(redis_url=SecretStr(redis_url), namespace=namespace)
    add = parse("add", "--name", "lonely", "--provider", "echo", "--wait", "20")
    assert await run_command(settings, add) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["serving"] == []
    assert "no live worker serves pool 'default'" in captured.err


async def test_remove_wait_names_a_worker_that_still_serves_the_model(
    client: Redis,
    redis_url: str,
    namespace: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A model also declared in a worker's models file stays served after its runtime spec
    goes: `remove --wait` says which worker and exits 1."""
    settings = Settings(redis_url=SecretStr(redis_url), namespace=namespace)
    keys = Keys(namespace)
    models = tmp_path / "models.toml"
    models.write_text('[models.both]\nprovider = "echo"\n')
    env = worker_env(redis_url, namespace, models_poll_s=1, block_ms=200, models_file=models)
    with terminating(spawn_cli(["worker"], env, tmp_path / "w.log")):
        await wait_for(lambda: _workers(client, keys, 1), 30)
        assert (
            await run_command(settings, parse("add", "--name", "both", "--provider", "echo")) == 0
        )
        capsys.readouterr()
        assert await run_command(settings, parse("remove", "both", "--wait", "20")) == 1
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)["serving"]) == 1
    assert "is still served by " in captured.err and "models file" in captured.err
