"""The Redis ACL of docs/operations.md, for real: all of sop-llm works as that user, and the
user can do nothing more.

The user is created from the documented line, verbatim but for the password, on a private
redis-server. Worker processes, the sidecar process, the CLI and the producer SDK then run as
that user through every path that talks to Redis (plain, streaming, cancelled, idempotent,
retried, dead-lettered and requeued tasks, a reply stream read by a group, tasks parked behind
a busy model, a webhook retried once, a killed worker's task taken over, a clean shutdown,
retention trimming, model registration, a GPU semaphore handed over). ``ACL LOG`` records
every refusal, even one a client swallows, so it must stay empty; commands and keys outside
the list must then be refused.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

from sop_llm.gpu.semaphore import Device, GpuSemaphore, SemaphoreConfig
from sop_llm.ops.gpu_setup import device_keys
from sop_llm.schemas.result import TaskState
from sop_llm.streams.control import CancelOutcome
from sop_llm.streams.dead import all_dead
from sop_llm.streams.entries import text
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.conftest import (
    ROOT,
    RedisServer,
    free_port,
    spawn_cli,
    terminating,
    wait_for,
    worker_env,
)
from tests.providers.wire import oa_chunks, oa_completion, oa_error, sse_reply

PASSWORD = "acl-test-password"
BACKEND_KEY = "FlakyBackendKey-7"  # the fake backend echoes it back in its errors
RETRY_ONCE = "fail once, then answer"
DEAD_UNTIL_OPENED = "fail until the backend is fixed"
SLOW = "a slow answer"


def documented_acl() -> list[str]:
    """The ``ACL SETUSER`` line of docs/operations.md, with the test's password."""
    text = (ROOT / "docs" / "operations.md").read_text()
    [line] = [ln for ln in text.splitlines() if ln.startswith("ACL SETUSER sop-llm ")]
    assert "<password>" in line
    return line.replace("<password>", PASSWORD).split()


@dataclass(slots=True)
class Backend:
    """An OpenAI-compatible server whose errors repeat the request's Authorization header."""

    url: str = ""
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    fixed: asyncio.Event = field(default_factory=asyncio.Event)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        self.calls[prompt] += 1
        if prompt.startswith(SLOW):
            await asyncio.sleep(0.2)  # the model's one slot stays busy: the next tasks park
        failing = (prompt == RETRY_ONCE and self.calls[prompt] == 1) or (
            prompt == DEAD_UNTIL_OPENED and not self.fixed.is_set()
        )
        if failing:
            auth = request.headers.get("Authorization", "")
            return web.json_response(
                oa_error(f"busy; you sent Authorization: {auth}", type_="server_error"),
                status=503,
                headers={"retry-after-ms": "100"},
            )
        answer = f"answer to: {prompt}"
        if body.get("stream"):
            return await sse_reply(oa_chunks([answer]), done=True)(request)
        return web.json_response(oa_completion(answer))


@dataclass(slots=True)
class Receiver:
    """A webhook endpoint that fails the first delivery and takes the next."""

    url: str = ""
    attempts: int = 0

    async def hook(self, request: web.Request) -> web.Response:
        await request.read()
        self.attempts += 1
        return web.Response(status=503 if self.attempts == 1 else 204)


@contextlib.asynccontextmanager
async def serving(route: str, handler: Any) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post(route, handler)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def cli(env: dict[str, str], *args: str) -> str:
    """Run ``sop-llm <args>``; its stdout, after checking it exited 0."""
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sop_llm.ops.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout.decode()


async def field_of(client: Redis, keys: Keys, task_id: str, name: str) -> str | None:
    value = await client.hget(keys.task(task_id), name)
    return None if value is None else text(value)


async def semaphore_handover(client: Redis, keys: Keys) -> None:
    """One holder, one waiter, the permit handed over: every script of the GPU semaphore."""
    config = SemaphoreConfig(permits=1, lease_ms=3000, poll_s=0.05)
    sem = GpuSemaphore(
        client=client,
        keys=device_keys(keys, "acl-host", 0),
        device=Device("acl-host", 0),
        config=config,
    )

    async def second() -> None:
        async with sem.slot(priority=1, holder_id="second", timeout=10):
            pass

    async with sem.slot(priority=0, holder_id="first", timeout=5):
        waiter = asyncio.create_task(second())
        await wait_for(lambda: _has_waiter(sem), 5)
    await asyncio.wait_for(waiter, 10)
    state = await sem.inspect()
    assert state.holders == [] and state.waiters == []


async def _has_waiter(sem: GpuSemaphore) -> bool:
    return bool((await sem.inspect()).waiters)


async def test_the_documented_acl_is_enough_and_no_more(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    admin = Redis.from_url(private_redis.url)
    # the documented line as it is (redis-py's typed acl_setuser would rebuild it)
    await admin.execute_command(*documented_acl())  # type: ignore[no-untyped-call]
    url = f"redis://sop-llm:{PASSWORD}@127.0.0.1:{private_redis.port}/0"
    user = Redis.from_url(url, socket_timeout=15)
    keys = Keys("sop")
    backend, receiver = Backend(), Receiver()
    models = tmp_path / "models.toml"
    env = worker_env(
        url,
        keys.namespace,
        echo_tokens_per_s=50,
        max_attempts=2,
        retry_poll_ms=50,
        lease_ttl_ms=1000,
        reclaim_interval_ms=200,
        block_ms=200,
        trim_interval_s=0.5,
        models_file=models,
        webhook_allow="127.0.0.1",
        webhook_secrets="whsec_" + base64.b64encode(b"k" * 32).decode(),
        webhook_schedule_s="0,0.2",
    )
    env["FLAKY_BACKEND_KEY"] = BACKEND_KEY
    side_port = free_port()
    base = f"http://127.0.0.1:{side_port}"
    p = Producer(
        ProducerConfig(namespace=keys.namespace, webhook_allow=("127.0.0.1",)), client=user
    )
    try:
        async with (
            serving("/v1/chat/completions", backend.chat) as backend.url,
            serving("/hook", receiver.hook) as receiver_base,
            aiohttp.ClientSession() as http,
        ):
            receiver.url = f"{receiver_base}/hook"
            models.write_text(
                "[models.flaky]\n"
                'provider = "openai_compatible"\n'
                'model_id = "flaky"\n'
                f'base_url = "{backend.url}/v1"\n'
                'api_key_env = "FLAKY_BACKEND_KEY"\n'
                "timeout_s = 5\n"
                "concurrency = 1\n"
            )
            with (
                terminating(
                    spawn_cli(["worker"], {**env, "SOP_WORKER_NAME": "a"}, tmp_path / "a.log")
                ) as first,
                terminating(
                    spawn_cli(
                        ["sidecar"], {**env, "SOP_SIDECAR_PORT": str(side_port)}, tmp_path / "s.log"
                    )
                ),
            ):
                await wait_for(lambda: _status(http, f"{base}/health/ready", 200), 30)

                plain = await _tasks(p, user, keys, http, base)
                await _failures(p, user, keys, backend, env)
                await _deliveries(p, user, keys, receiver)
                for path in (f"/v1/tasks/{plain}", "/v1/queue", "/metrics"):
                    assert await _status(http, f"{base}{path}", 200), path
                await _cli_reads_and_models(env, plain, backend.url)

                # a worker killed mid-task: another one, as the same user, takes its task over
                taken = await p.submit("echo", "take me over", max_tokens=100)  # 2 s
                await wait_for(lambda: _is(user, keys, taken, "worker", "a"), 10)
                await wait_for(lambda: _is(user, keys, taken, "state", "running"), 10)
                first.kill()
                first.wait(10)
                with terminating(
                    spawn_cli(["worker"], {**env, "SOP_WORKER_NAME": "b"}, tmp_path / "b.log")
                ) as second:
                    result = await p.wait(taken, timeout=30)
                    assert (result.state, result.worker) == (TaskState.COMPLETED, "b")
                    # retention trimming runs (every 0.5 s), as this user too
                    await wait_for(lambda: admin.exists(keys.trim_lock), 10)
                    second.send_signal(signal.SIGTERM)  # a clean stop drops its lease
                    assert await asyncio.to_thread(second.wait, 15) == 0

        await semaphore_handover(user, keys)
        # redis-py's connection handshake sends CLIENT SETINFO and swallows a refusal; before
        # Redis 7.2 the subcommand does not exist and cannot be granted, so a refused `client`
        # is the handshake's, not ours (docs/operations.md grants it from 7.2 on)
        refused = [e for e in await admin.acl_log() if e["object"] != "client"]
        assert refused == [], (refused, _logs(tmp_path))

        # ...and nothing more
        for command in (
            ("FLUSHALL",),
            ("KEYS", "*"),
            ("SCAN", "0"),
            ("CONFIG", "GET", "maxmemory"),
            ("EVAL", "return 1", "0"),
            ("ACL", "WHOAMI"),
            ("GET", "elsewhere"),
            ("SET", "{other}:x", "1"),
            ("XADD", "{sop2}:results", "*", "k", "v"),
        ):
            with pytest.raises(NoPermissionError):
                await user.execute_command(*command)  # type: ignore[no-untyped-call]
        # a script can do no more than its caller
        sha = await user.script_load("return redis.call('FLUSHALL')")
        with pytest.raises(ResponseError, match="can't run this command"):
            await user.evalsha(sha, 0)
        assert await admin.dbsize() > 0
    finally:
        await user.aclose()
        await admin.aclose()


async def _tasks(
    p: Producer, user: Redis, keys: Keys, http: aiohttp.ClientSession, base: str
) -> str:
    """Plain, streaming (SDK and SSE), cancelled, idempotent and reply_to tasks; returns the
    plain task's id."""
    plain = await p.submit("echo", "plain task", max_tokens=2)
    assert (await p.wait(plain, timeout=10)).state == TaskState.COMPLETED

    streamed = await p.submit("echo", "one two three", max_tokens=3, stream=True)
    assert "".join([d async for d in p.stream(streamed)]) == "one two three"
    async with http.get(f"{base}/v1/tasks/{streamed}/stream") as r:
        assert r.status == 200 and "event: end" in await r.text()

    slow = await p.submit("echo", "slow", max_tokens=5000)
    await wait_for(lambda: _is(user, keys, slow, "state", "running"), 10)
    assert await p.cancel(slow) == CancelOutcome.REQUESTED
    assert (await p.wait(slow, timeout=10)).state == TaskState.CANCELLED

    once = await p.submit("echo", "once", max_tokens=2, idempotency_key="k1")
    assert await p.submit("echo", "once", max_tokens=2, idempotency_key="k1") == once

    replied = await p.submit("echo", "reply to me", max_tokens=2, reply_to="svc")
    outcomes = p.results(reply_to="svc", group="svc-readers")
    assert (await asyncio.wait_for(anext(outcomes), 10)).task_id == replied
    await outcomes.aclose()
    return plain


async def _failures(
    p: Producer, user: Redis, keys: Keys, backend: Backend, env: dict[str, str]
) -> None:
    """A retried task, a dead-lettered one requeued, tasks parked behind a busy model."""
    retried = await p.submit("flaky", RETRY_ONCE)
    result = await p.wait(retried, timeout=20)
    assert (result.state, result.attempts) == (TaskState.COMPLETED, 2)

    dead = await p.submit("flaky", DEAD_UNTIL_OPENED)
    result = await p.wait(dead, timeout=20)
    assert result.state == TaskState.FAILED and result.error is not None
    [letter] = [d for d in await all_dead(user, keys) if d.letter.task_id == dead]
    record = await user.hgetall(keys.task(dead))
    stored = json.dumps(
        [letter.letter.model_dump(mode="json"), {text(k): text(v) for k, v in record.items()}]
    )
    assert "busy; you sent Authorization: Bearer [redacted]" in stored
    assert BACKEND_KEY not in stored  # the backend echoed the key: it was never stored
    backend.fixed.set()
    await cli(env, "dead", "requeue", "--task-id", dead)
    await wait_for(lambda: _is(user, keys, dead, "state", "completed"), 20)

    slow_ones = [await p.submit("flaky", f"{SLOW} {i}") for i in range(3)]
    for task_id in slow_ones:
        assert (await p.wait(task_id, timeout=20)).state == TaskState.COMPLETED


async def _deliveries(p: Producer, user: Redis, keys: Keys, receiver: Receiver) -> None:
    """A webhook refused once, then delivered."""
    hooked = await p.submit("echo", "call me", max_tokens=2, webhook_url=receiver.url)
    await wait_for(lambda: _is(user, keys, hooked, "webhook_state", "delivered"), 20)
    assert receiver.attempts == 2


async def _cli_reads_and_models(env: dict[str, str], task_id: str, backend_url: str) -> None:
    await cli(env, "inspect", "--json")
    await cli(env, "status", task_id)
    await cli(env, "dead", "list")
    spare = {"name": "spare", "provider": "openai", "model_id": "m", "base_url": backend_url}
    await cli(env, "models", "add", "--spec", json.dumps(spare))
    await cli(env, "models", "remove", "spare")


async def _status(http: aiohttp.ClientSession, url: str, status: int) -> bool:
    try:
        async with http.get(url) as r:
            return r.status == status
    except aiohttp.ClientConnectionError:
        return False


async def _is(client: Redis, keys: Keys, task_id: str, name: str, value: str) -> bool:
    return await field_of(client, keys, task_id, name) == value


def _logs(tmp_path: Path) -> str:
    return "\n".join(
        f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(tmp_path.glob("*.log"))
    )
