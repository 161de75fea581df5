"""`sop-llm replay` against a real Redis: selection, sandbox re-publishing, in-process re-runs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr
from redis.asyncio import Redis

from sop_llm.handlers.webhooks import WebhookConfig, WebhookSender
from sop_llm.ops import replay
from sop_llm.ops.cli import replay as replay_cli
from sop_llm.ops.replay_select import Candidate, Filters, entry_matches, parse_time
from sop_llm.ops.settings import Settings
from sop_llm.providers.echo import EchoProvider
from sop_llm.providers.errors import BadRequestError
from sop_llm.schemas.result import TaskState
from sop_llm.streams.entries import entries_from_range
from sop_llm.streams.keys import DEFAULT_PARTITIONS, Keys
from sop_llm.streams.status import read_status
from tests.conftest import drop_namespace, wait_for
from tests.fakes import ScriptedProvider
from tests.harness import echo_registry, running_worker, wait_results, xadd_task


@pytest.fixture
def sandbox() -> Iterator[str]:
    """A sandbox namespace of this test's own, deleted afterwards."""
    ns = f"sbx{uuid.uuid4().hex[:12]}"
    yield ns
    drop_namespace(ns)


def settings_for(redis_url: str, namespace: str) -> Settings:
    return Settings(redis_url=SecretStr(redis_url), namespace=namespace)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sop-llm")
    replay_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["replay", *argv])


class Receiver:
    """A webhook receiver on 127.0.0.1 that records every request."""

    def __init__(self) -> None:
        self.hits: list[bytes] = []
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append(await request.read())
        return web.Response(status=200)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    rec.port = runner.addresses[0][1]
    yield rec
    await runner.cleanup()


@contextlib.asynccontextmanager
async def sending(client: Redis, keys: Keys, consumer: str) -> AsyncIterator[WebhookSender]:
    config = WebhookConfig(
        consumer=consumer, allow=("127.0.0.1",), schedule_s=(0,), timeout_s=2.0, block_ms=50,
        promote_interval_ms=50, reclaim_interval_ms=100, lease_ttl_ms=1000, shutdown_grace_s=1.0,
    )  # fmt: skip
    sender = WebhookSender(client=client, keys=keys, config=config)
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(stop))
    try:
        yield sender
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task


async def snapshot(client: Redis, keys: Keys, *task_ids: str) -> dict[str, Any]:
    """Length and newest id of every stream of a namespace, and the given status records."""
    streams = [keys.results, keys.webhooks, keys.dead, keys.webhooks_dead, keys.tasks_delayed]
    streams += [keys.tasks("default", p) for p in DEFAULT_PARTITIONS]
    out: dict[str, Any] = {}
    for s in streams:
        if await client.type(s) == b"stream":
            newest = await client.xrevrange(s, count=1)
            out[s] = (await client.xlen(s), newest[0][0] if newest else None)
        else:
            out[s] = await client.exists(s)
    for task_id in task_ids:
        out[task_id] = await client.hgetall(keys.task(task_id))
    return out


async def test_failed_task_replays_into_sandbox_and_production_is_untouched(
    client: Redis, keys: Keys, redis_url: str, sandbox: str, receiver: Receiver,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    prod_registry = echo_registry()
    prod_registry.register("flaky", ScriptedProvider([BadRequestError("refused by the model")]))
    await xadd_task(client, keys, {
        "task_id": "orig-1", "model": "flaky", "prompt": "hello replay world", "max_tokens": 3,
        "webhook_url": receiver.url, "idempotency_key": "once", "metadata": {"customer": "c1"},
    })  # fmt: skip
    async with (
        running_worker(client, keys, registry=prod_registry),
        sending(client, keys, "webhook-prod"),
    ):
        [original] = await wait_results(client, keys, 1)
        # the receiver is reachable: the original outcome was delivered to it
        await wait_for(lambda: len(receiver.hits) == 1, timeout=10)
    assert original.state == TaskState.FAILED and original.error is not None
    assert original.error.code == "bad_request"
    before = await snapshot(client, keys, "orig-1")

    rc = await replay_cli.run(settings_for(redis_url, keys.namespace),
                          parse("results", "--state", "failed", "--sandbox", sandbox))  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    [line] = out.splitlines()
    old_id, new_id = line.split(" -> ")
    assert old_id == "orig-1" and new_id != "orig-1"

    sbx = Keys(sandbox)
    [entry] = entries_from_range(sbx.tasks("default", "normal"),
                                 await client.xrange(sbx.tasks("default", "normal")))  # fmt: skip
    published = json.loads(entry.data or b"")
    assert "webhook_url" not in published and "idempotency_key" not in published
    sbx_registry = echo_registry()
    sbx_registry.register("flaky", EchoProvider())  # the sandbox runs a fixed model
    async with (
        running_worker(client, sbx, registry=sbx_registry, consumer="sbx-w1"),
        sending(client, sbx, "webhook-sbx"),
    ):
        [copy] = await wait_results(client, sbx, 1)
        assert copy.task_id == new_id and copy.state == TaskState.COMPLETED
        assert copy.text == "hello replay world"
        assert copy.metadata == {"customer": "c1", "replay_of": "orig-1",
                                 "replay_namespace": keys.namespace}  # fmt: skip
        record = await read_status(client, sbx, new_id)
        assert record is not None and record.webhook is None
        assert await client.xlen(sbx.webhooks) == 0  # no delivery job: nothing can be sent
    assert await snapshot(client, keys, "orig-1") == before
    assert len(receiver.hits) == 1  # only the original's delivery, before the replay


async def test_dead_letters_replay_from_their_raw_fields(
    client: Redis, keys: Keys, redis_url: str, sandbox: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await xadd_task(client, keys, {"task_id": "lost-1", "model": "gone", "prompt": "a b"})
    async with running_worker(client, keys):
        [failed] = await wait_results(client, keys, 1)
    assert failed.error is not None and failed.error.code == "model_not_found"
    settings = settings_for(redis_url, keys.namespace)

    assert await replay_cli.run(settings, parse("dead", "--model-filter", "gone")) == 0
    listing = capsys.readouterr().out
    assert "lost-1" in listing and "state=failed" in listing

    assert await replay_cli.run(settings, parse("dead", "--sandbox", sandbox)) == 0
    new_id = capsys.readouterr().out.split(" -> ")[1].strip()
    sbx_registry = echo_registry()
    sbx_registry.register("gone", EchoProvider())
    async with running_worker(client, Keys(sandbox), registry=sbx_registry, consumer="sbx-w1"):
        [copy] = await wait_results(client, Keys(sandbox), 1)
    assert copy.task_id == new_id and copy.text == "a b a b a b a b a b a b a b a b"
    assert copy.metadata == {"replay_of": "lost-1", "replay_namespace": keys.namespace}


async def test_trimmed_or_expired_originals_are_reported_per_task(
    client: Redis, keys: Keys, redis_url: str, sandbox: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for task_id in ("gone-event", "gone-status", "fine"):
        await xadd_task(client, keys, {"task_id": task_id, "model": "echo", "prompt": task_id})
    async with running_worker(client, keys):
        await wait_results(client, keys, 3)
    record = await read_status(client, keys, "gone-event")
    assert record is not None and record.stream and record.entry_id
    await client.xdel(record.stream, record.entry_id)
    await client.delete(keys.task("gone-status"))

    rc = await replay_cli.run(settings_for(redis_url, keys.namespace),
                          parse("results", "--sandbox", sandbox))  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 1
    assert captured.out.startswith("fine -> replay-") and len(captured.out.splitlines()) == 1
    assert f"gone-event: not replayed: original event {record.entry_id} was trimmed" in captured.err
    assert "gone-status: not replayed: status record expired" in captured.err
    assert await client.xlen(Keys(sandbox).tasks("default", "normal")) == 1


async def test_run_prints_the_new_output_beside_the_recorded_one(
    client: Redis, keys: Keys, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = echo_registry()
    registry.register("old", ScriptedProvider(["the old answer"]))
    await xadd_task(client, keys, {"task_id": "r1", "model": "old", "prompt": "alpha beta gamma",
                                   "max_tokens": 3})  # fmt: skip
    async with running_worker(client, keys, registry=registry):
        await wait_results(client, keys, 1)
    before = await snapshot(client, keys, "r1")
    settings = settings_for(redis_url, keys.namespace)

    rc = await replay_cli.run(
        settings, parse("results", "--task-id", "r1", "--run", "--model", "echo")
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "recorded: completed (stop)  tokens in 3 / out 3" in out
    assert "replay:   completed (length) with echo  tokens in 3 / out 3  run " in out
    assert "--- recorded\n+++ replay\n@@ -1 +1 @@\n-the old answer\n+alpha beta gamma" in out

    # the recorded model is not served in-process: said per task, and nothing is written
    assert await replay_cli.run(settings, parse("tasks", "--run")) == 1
    assert "replay:   failed (model_not_found: model: 'old' is not registered" in (
        capsys.readouterr().out
    )
    assert await snapshot(client, keys, "r1") == before


async def test_selection_by_id_time_task_model_state_and_limit(
    client: Redis, keys: Keys, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = [await xadd_task(client, keys, {"task_id": f"s{i}", "model": "echo" if i % 2 else "m2",
                                          "prompt": "x"}) for i in range(5)]  # fmt: skip
    high = await xadd_task(client, keys, {"model": "echo", "prompt": "no id"}, partition="high")
    derived = f"default.high.{high}"  # the documented id of a task published without one
    settings = settings_for(redis_url, keys.namespace)

    async def listed(*argv: str) -> list[str]:
        assert await replay_cli.run(settings, parse(*argv)) == 0
        return [line.split()[1] for line in capsys.readouterr().out.splitlines()]

    assert await listed("normal", "--from-id", ids[1], "--to-id", ids[3]) == ["s1", "s2", "s3"]
    assert await listed("normal", "--model-filter", "m2") == ["s0", "s2", "s4"]
    assert await listed("normal", "--task-id", "s4", "--task-id", "s0") == ["s0", "s4"]
    assert await listed("normal", "--limit", "2") == ["s0", "s1"]
    assert await listed("normal", "--since", "1h", "--limit", "1") == ["s0"]
    assert await listed("normal", "--until", "2000-01-01T00:00:00Z") == []
    everything = await listed("tasks")  # oldest first; in the same millisecond, high first
    assert sorted(everything) == sorted(["s0", "s1", "s2", "s3", "s4", derived])
    async with running_worker(client, keys):
        await wait_results(client, keys, 6)
    completed = await listed("tasks", "--state", "completed", "--model-filter", "echo")
    assert sorted(completed) == sorted(["s1", "s3", derived])
    # m2 is not served: those failed (results come in finishing order)
    assert sorted(await listed("results", "--state", "failed")) == ["s0", "s2", "s4"]


async def test_sandbox_must_differ_from_production(
    client: Redis, keys: Keys, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await xadd_task(client, keys, {"task_id": "p1", "model": "echo", "prompt": "x"})
    before = await snapshot(client, keys)
    rc = await replay_cli.run(settings_for(redis_url, keys.namespace),
                          parse("tasks", "--sandbox", keys.namespace))  # fmt: skip
    assert rc == 2 and "must differ" in capsys.readouterr().err
    assert await snapshot(client, keys) == before


def test_sandbox_copy_is_linked_and_stripped() -> None:
    c = Candidate(
        task_id="t1", source="tasks", stream="s", entry_id="1-0", origin_stream="s",
        event={"task_id": "t1", "model": "echo", "prompt": "p", "webhook_url": "https://x/h",
               "idempotency_key": "k", "deadline": "2020-01-01T00:00:00Z", "timeout_s": 5,
               "metadata": {"a": 1, "replay_of": "spoofed"}, "reply_to": "svc"},
    )  # fmt: skip
    body = json.loads(replay.sandbox_data(c, new_id="n1", namespace="prod"))
    assert body == {
        "task_id": "n1", "model": "echo", "prompt": "p", "timeout_s": 5, "reply_to": "svc",
        "metadata": {"a": 1, "replay_of": "t1", "replay_namespace": "prod"},
    }  # fmt: skip


def test_times_and_id_bounds() -> None:
    now = 10_000_000
    assert parse_time("2h", now_ms=now) == now - 7_200_000
    assert parse_time("90s", now_ms=now) == now - 90_000
    assert parse_time("1970-01-01T00:00:01Z", now_ms=now) == 1000
    assert parse_time("1970-01-01T01:00:00+01:00", now_ms=now) == 0
    assert parse_time("1970-01-01T00:00:02", now_ms=now) == 2000  # no zone: UTC
    assert parse_time("1234", now_ms=now) == 1234
    with pytest.raises(ValueError, match="neither an ISO time"):
        parse_time("yesterday", now_ms=now)
    assert Filters().bounds() == ("0-0", "+")
    assert Filters(from_id="5", since_ms=7, to_id="9-3").bounds() == ("7-0", "9-3")
    assert Filters(until_ms=8, to_id="9").bounds() == ("0-0", f"8-{2**64 - 1}")
    assert Filters(from_id="9-0", to_id="8-0").bounds() is None
    with pytest.raises(ValueError, match="not a stream entry id"):
        Filters(from_id="abc").bounds()


def test_tail_filters() -> None:
    result = {"id": "1-0", "type": "task.failed",
              "data": {"task_id": "t1", "state": "failed", "model": "m"}}  # fmt: skip
    job = {"id": "2-0", "type": "webhook.delivery",
           "data": {"task_id": "t1", "payload": {"state": "completed", "model": "m"}}}  # fmt: skip
    raw = {"data": '{"model": "x", "prompt": "p"}'}
    dead = {"id": "3-0", "type": "task.dead", "data": {"task_id": "t2", "fields": raw}}
    event = {"id": "4-0", "type": "task.submitted", "data": {"task_id": "t3", "model": "m"}}
    assert entry_matches(result, "t1", "task.failed", "failed", "m")
    assert entry_matches(result, ["t9", "t1"], None, None, None)
    assert not entry_matches(result, "t2", None, None, None)
    assert not entry_matches(result, None, "task.completed", None, None)
    assert entry_matches(job, "t1", None, "completed", "m")
    assert entry_matches(dead, None, None, "failed", "x")
    assert not entry_matches(dead, None, None, None, "m")
    assert entry_matches(event, "t3", None, None, "m") and not entry_matches(
        event, None, None, "completed", None
    )
    assert entry_matches({"id": "5-0", "data": "not json"}, None, None, None, None)
    assert not entry_matches({"id": "5-0", "data": "not json"}, "t1", None, None, None)


def test_progress_bar() -> None:
    out = io.StringIO()
    bar = replay.Progress(2, out=out, enabled=True, width=4)
    bar.advance()
    bar.advance()
    bar.finish()
    assert "\r[##..] 1/2" in out.getvalue() and "\r[####] 2/2" in out.getvalue()
    quiet = io.StringIO()
    replay.Progress(1, out=quiet, enabled=True).advance()  # a single task needs no bar
    assert quiet.getvalue() == ""
