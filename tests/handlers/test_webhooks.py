"""The webhook sender against a real Redis and real aiohttp receivers on 127.0.0.1."""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import hashlib
import hmac
import ipaddress
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr
from redis.asyncio import Redis

from sop_llm.handlers.tasks import Worker, WorkerConfig
from sop_llm.handlers.webhooks import WebhookConfig, WebhookSender
from sop_llm.handlers.webhooks.policy import (
    Decision,
    decide,
    from_exception,
    from_response,
    parse_retry_after,
)
from sop_llm.ops.cli.webhooks import register, run_command
from sop_llm.ops.settings import Settings
from sop_llm.ops.webhook_setup import build_sender
from sop_llm.providers.echo import EchoProvider
from sop_llm.providers.registry import ModelRegistry
from sop_llm.schemas.result import TaskResult, TaskState, WebhookJob, WebhookStatus
from sop_llm.streams import keys as k
from sop_llm.streams.keys import DEFAULT_PARTITIONS, WEBHOOK_GROUP, Keys
from sop_llm.streams.status import read_status
from sop_llm.streams.urlguard import IPAddress
from tests.conftest import ROOT, RedisServer, wait_for

LOOPBACK = ("127.0.0.1",)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def spec_verifies(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks verification, written from the spec's text (not our signing code)."""
    key = base64.b64decode(secret[len("whsec_") :])
    content = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    fresh = abs(time.time() - int(headers["webhook-timestamp"])) <= 300
    for sig in headers.get("webhook-signature", "").split(" "):
        version, _, value = sig.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected) and fresh:
            return True
    return False


@pytest.fixture(autouse=True)
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Tripwire: every socket connect is recorded; one to a non-loopback address fails."""
    seen: list[tuple[str, int]] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guard(addr: Any) -> None:
        if isinstance(addr, tuple):
            seen.append((str(addr[0]), int(addr[1])))
            if not ipaddress.ip_address(str(addr[0]).partition("%")[0]).is_loopback:
                raise AssertionError(f"the test tried to connect to {addr}")

    def connect(self: socket.socket, addr: Any) -> None:
        guard(addr)
        real_connect(self, addr)

    def connect_ex(self: socket.socket, addr: Any) -> int:
        guard(addr)
        return real_connect_ex(self, addr)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return seen


@dataclass
class Hit:
    at: float
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Answers ``/hook`` with ``script[i]`` for its i-th hit (the last one repeats): a status
    code, a ``(status, headers)`` pair, or ``"hang"`` (never answers). With ``secrets`` it
    answers 401 to anything that does not verify."""

    script: list[Any] = field(default_factory=lambda: [200])
    secrets: list[str] = field(default_factory=list)
    hits: list[Hit] = field(default_factory=list)
    per_delivery: bool = False  # run the script per webhook-id, not over all hits
    port: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {key.lower(): v for key, v in request.headers.items()}
        self.hits.append(Hit(time.monotonic(), request.path, headers, body))
        if request.path != "/hook":
            return web.Response(status=200)
        if self.secrets and not any(spec_verifies(s, headers, body) for s in self.secrets):
            return web.Response(status=401)
        mine = [h for h in self.hits if h.path == "/hook"]
        if self.per_delivery:
            mine = [h for h in mine if h.headers.get("webhook-id") == headers.get("webhook-id")]
        n = len(mine)
        step = self.script[min(n, len(self.script)) - 1]
        if step == "hang":
            await self.release.wait()
            return web.Response(status=200)
        status, extra = step if isinstance(step, tuple) else (step, {})
        return web.Response(status=status, headers=extra)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.port = runner.addresses[0][1]
    yield rec
    rec.release.set()
    await runner.cleanup()


def config(**overrides: Any) -> WebhookConfig:
    base: dict[str, Any] = {
        "consumer": f"webhook-test-{uuid.uuid4().hex[:8]}", "allow": LOOPBACK, "schedule_s": (0,),
        "timeout_s": 2.0, "block_ms": 50, "promote_interval_ms": 50, "reclaim_interval_ms": 100,
        "lease_ttl_ms": 1000, "shutdown_grace_s": 1.0,
    }  # fmt: skip
    return WebhookConfig(**{**base, **overrides})


@contextlib.asynccontextmanager
async def sending(sender: WebhookSender) -> AsyncIterator[WebhookSender]:
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(stop))
    try:
        yield sender
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task


def running(
    client: Redis, keys: Keys, **overrides: Any
) -> contextlib.AbstractAsyncContextManager[WebhookSender]:
    return sending(WebhookSender(client=client, keys=keys, config=config(**overrides)))


async def publish(client: Redis, keys: Keys, url: str, *, status_record: bool = True) -> WebhookJob:
    """What the terminal write leaves: a delivery job, and webhook_state=pending."""
    now = int(time.time() * 1000)
    task_id = f"t-{uuid.uuid4().hex[:10]}"
    result = TaskResult(task_id=task_id, state=TaskState.COMPLETED, model="echo", text="hi there",
                        finish_reason="stop", finished_at=now)  # fmt: skip
    job = WebhookJob(delivery_id=f"msg_{uuid.uuid4().hex}", task_id=task_id, url=url,
                     event="task.completed", payload=result, created_at=now)  # fmt: skip
    if status_record:
        await client.hset(keys.task(task_id), mapping={
            k.F_STATE: "completed", k.F_TASK_ID: task_id, k.F_RESULT: result.model_dump_json(),
            k.F_WEBHOOK_STATE: "pending", k.F_WEBHOOK_ATTEMPTS: 0,
        })  # fmt: skip
        await client.expire(keys.task(task_id), 600)
    await client.xadd(keys.webhooks, {"type": "webhook.delivery", "data": job.model_dump_json()})
    return job


async def webhook_status(client: Redis, keys: Keys, task_id: str) -> WebhookStatus | None:
    record = await read_status(client, keys, task_id)
    return record.webhook if record else None


async def settled(client: Redis, keys: Keys, task_id: str, state: str) -> WebhookStatus | None:
    status = await webhook_status(client, keys, task_id)
    return status if status is not None and status.state == state else None


async def dead_letters(client: Redis, keys: Keys) -> list[dict[str, Any]]:
    rows: Any = await client.xrange(keys.webhooks_dead)
    return [json.loads(fields[b"data"]) for _, fields in rows]


async def nothing_pending(client: Redis, keys: Keys) -> bool:
    summary = await client.xpending(keys.webhooks, WEBHOOK_GROUP)
    return int(summary["pending"]) == 0 and await client.zcard(keys.webhooks_delayed) == 0


async def test_task_outcome_is_delivered_signed(
    client: Redis, keys: Keys, receiver: Receiver
) -> None:
    new, old = new_secret(), new_secret()
    receiver.secrets = [old]  # a receiver not yet rotated verifies the old secret's signature
    registry = ModelRegistry()
    registry.register("echo", EchoProvider(tokens_per_s=0, slots=4))
    worker = Worker(client=client, keys=keys, registry=registry, config=WorkerConfig(
        consumer="w-1", pools=("default",), partitions=DEFAULT_PARTITIONS, slots=2))  # fmt: skip
    stop = asyncio.Event()
    async with sending(WebhookSender(client=client, keys=keys, config=config(secrets=(new, old)))):
        worker_task = asyncio.create_task(worker.run(stop))
        # one plain XADD, the wire format any producer uses
        task_id = f"t-{uuid.uuid4().hex[:10]}"
        event = {"task_id": task_id, "model": "echo", "prompt": "one two three",
                 "max_tokens": 3, "webhook_url": receiver.url()}  # fmt: skip
        await client.xadd(keys.tasks("default", "normal"),
                          {"type": "task.submitted", "data": json.dumps(event)})  # fmt: skip
        status = await wait_for(lambda: settled(client, keys, task_id, "delivered"), 10)
        stop.set()
        await asyncio.wait_for(worker_task, 10)
    assert status == WebhookStatus(state="delivered", attempts=1, last_status_code=200)
    [hit] = receiver.hits
    assert len(hit.headers["webhook-signature"].split(" ")) == 2
    assert hit.headers["webhook-id"].startswith("msg_")
    assert hit.headers["content-type"] == "application/json"
    doc = json.loads(hit.body)
    assert doc["type"] == "task.completed"
    assert doc["timestamp"].endswith("Z")
    assert doc["data"]["task_id"] == task_id
    assert doc["data"]["text"] == "one two three"
    assert await nothing_pending(client, keys)


@pytest.mark.parametrize(("thin", "limit"), [(True, 256 << 10), (False, 1024)])
async def test_thin_form_when_asked_or_over_the_size_limit(
    client: Redis, keys: Keys, receiver: Receiver, thin: bool, limit: int
) -> None:
    job = await publish(client, keys, receiver.url())
    big = job.model_copy(update={"payload": job.payload.model_copy(update={"text": "x" * 4000})})
    await client.xadd(keys.webhooks, {"type": "webhook.delivery", "data": big.model_dump_json()})
    async with running(client, keys, thin=thin, max_body_bytes=limit):
        await wait_for(lambda: len(receiver.hits) == 2, 5)
    bodies = sorted((json.loads(h.body) for h in receiver.hits), key=lambda d: len(d["data"]))
    assert bodies[0]["data"] == {"task_id": job.task_id}
    if not thin:  # the small one is sent whole; only the big one is cut to ids
        assert bodies[1]["data"]["text"] == "hi there"


async def test_three_failures_then_success_rising_delays_and_no_sender_waits(
    client: Redis, keys: Keys, receiver: Receiver
) -> None:
    receiver.script = [500, 503, 500, 200]
    flaky = await publish(client, keys, receiver.url())
    async with running(client, keys, schedule_s=(0, 0.2, 0.4, 0.8), concurrency=1):
        await wait_for(lambda: len(receiver.hits) == 2, 5)
        # with one slot, a second delivery goes out while the first waits for its retry
        other = await publish(client, keys, receiver.url("/other"))
        await wait_for(lambda: settled(client, keys, flaky.task_id, "delivered"), 5)
    paths = [h.path for h in receiver.hits]
    assert paths == ["/hook", "/hook", "/other", "/hook", "/hook"]
    hits = [h for h in receiver.hits if h.path == "/hook"]
    assert len(hits) == 4
    assert {h.headers["webhook-id"] for h in hits} == {flaky.delivery_id}
    gaps = [b.at - a.at for a, b in itertools.pairwise(hits)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.8, gaps
    assert gaps[0] < gaps[1] < gaps[2], gaps
    status = await webhook_status(client, keys, flaky.task_id)
    assert status == WebhookStatus(state="delivered", attempts=4, last_status_code=200)
    assert other.delivery_id != flaky.delivery_id
    assert await nothing_pending(client, keys)


async def test_gone_stops_at_once(client: Redis, keys: Keys, receiver: Receiver) -> None:
    receiver.script = [410]
    job = await publish(client, keys, receiver.url())
    async with running(client, keys, schedule_s=(0, 0.05, 0.05)):
        status = await wait_for(lambda: settled(client, keys, job.task_id, "failed"), 5)
    assert len(receiver.hits) == 1
    assert status == WebhookStatus(state="failed", attempts=1, last_status_code=410,
                                   last_error="gone")  # fmt: skip
    [dead] = await dead_letters(client, keys)
    assert dead["reason"] == "gone"
    assert [(a["status"], a["error"]) for a in dead["attempts"]] == [(410, "gone")]


async def test_redirect_is_a_failure_and_never_followed(
    client: Redis, keys: Keys, receiver: Receiver
) -> None:
    receiver.script = [(302, {"Location": "/elsewhere"})]
    job = await publish(client, keys, receiver.url())
    async with running(client, keys, schedule_s=(0, 0.05)):
        await wait_for(lambda: settled(client, keys, job.task_id, "failed"), 5)
    assert [h.path for h in receiver.hits] == ["/hook", "/hook"]
    [dead] = await dead_letters(client, keys)
    assert dead["reason"] == "exhausted"
    assert [(a["status"], a["error"]) for a in dead["attempts"]] == [(302, "redirect")] * 2


async def test_hanging_receiver_is_a_failed_attempt(
    client: Redis, keys: Keys, receiver: Receiver
) -> None:
    receiver.script = ["hang"]
    job = await publish(client, keys, receiver.url())
    started = time.monotonic()
    async with running(client, keys, timeout_s=0.3, schedule_s=(0,)):
        status = await wait_for(lambda: settled(client, keys, job.task_id, "failed"), 5)
    assert time.monotonic() - started < 3
    assert status == WebhookStatus(state="failed", attempts=1, last_error="timeout")
    [dead] = await dead_letters(client, keys)
    assert [(a.get("status"), a["error"]) for a in dead["attempts"]] == [(None, "timeout")]


async def test_every_attempt_reaches_the_dead_letter_then_redeliver(
    client: Redis, keys: Keys, receiver: Receiver, redis_url: str
) -> None:
    receiver.script = [503, 500, 404, 200]
    job = await publish(client, keys, receiver.url())
    async with running(client, keys, schedule_s=(0, 0.05, 0.05)):
        status = await wait_for(lambda: settled(client, keys, job.task_id, "failed"), 5)
        assert status == WebhookStatus(state="failed", attempts=3, last_status_code=404,
                                       last_error="http_status")  # fmt: skip
        [dead] = await dead_letters(client, keys)
        assert dead["reason"] == "exhausted" and dead["delivery_id"] == job.delivery_id
        assert [a["status"] for a in dead["attempts"]] == [503, 500, 404]
        assert {a["error"] for a in dead["attempts"]} == {"http_status"}

        settings = Settings(redis_url=SecretStr(redis_url), namespace=keys.namespace)
        parser = argparse.ArgumentParser()
        register(parser.add_subparsers(dest="command"))
        assert await run_command(settings, parser.parse_args(["webhooks", "dead"])) == 0
        args = parser.parse_args(["webhooks", "redeliver", job.task_id])
        assert await run_command(settings, args) == 0
        await wait_for(lambda: settled(client, keys, job.task_id, "delivered"), 5)
    assert len(receiver.hits) == 4
    assert {h.headers["webhook-id"] for h in receiver.hits} == {job.delivery_id}
    assert await dead_letters(client, keys) == []
    missing = parser.parse_args(["webhooks", "redeliver", "no-such-task"])
    assert await run_command(settings, missing) == 1


async def test_retry_after_is_honoured(client: Redis, keys: Keys, receiver: Receiver) -> None:
    receiver.script = [(429, {"Retry-After": "1"}), 200]
    job = await publish(client, keys, receiver.url())
    async with running(client, keys, schedule_s=(0, 0.01)):
        await wait_for(lambda: settled(client, keys, job.task_id, "delivered"), 5)
    first, second = receiver.hits
    assert second.at - first.at >= 1.0


@pytest.mark.parametrize(
    "target", ["127.0.0.1", "10.0.0.1", "169.254.169.254", "[::1]", "localhost", "rebound.test"]
)
async def test_unsafe_addresses_are_refused_before_connecting(
    client: Redis, keys: Keys, receiver: Receiver, connects: list[tuple[str, int]], target: str
) -> None:
    async def dns(host: str, port: int, family: int) -> list[IPAddress]:
        table = {"rebound.test": ["93.184.216.34", "10.1.1.1"], "localhost": ["127.0.0.1"]}
        return [ipaddress.ip_address(a) for a in table[host]]

    job = await publish(client, keys, receiver.url(host=target))
    sender = WebhookSender(client=client, keys=keys, config=config(allow=()), lookup=dns)
    async with sending(sender):
        status = await wait_for(lambda: settled(client, keys, job.task_id, "failed"), 5)
    assert status is not None and status.last_error == "refused" and status.attempts == 1
    [dead] = await dead_letters(client, keys)
    assert dead["reason"] == "refused"
    assert receiver.hits == []
    assert not [c for c in connects if c[1] == receiver.port or c[0] != "127.0.0.1"]


async def test_connects_to_the_vetted_address_keeping_the_host(
    client: Redis, keys: Keys, receiver: Receiver
) -> None:
    # a name only our resolver knows: delivery proves the connection used the vetted address
    async def dns(host: str, port: int, family: int) -> list[IPAddress]:
        assert host == "receiver.test"
        return [ipaddress.ip_address("127.0.0.1")]

    job = await publish(client, keys, receiver.url(host="receiver.test"))
    sender = WebhookSender(client=client, keys=keys, config=config(), lookup=dns)
    async with sending(sender):
        await wait_for(lambda: settled(client, keys, job.task_id, "delivered"), 5)
    assert receiver.hits[0].headers["host"] == f"receiver.test:{receiver.port}"


async def test_expired_status_record_is_not_recreated(
    client: Redis, keys: Keys, receiver: Receiver
) -> None:
    job = await publish(client, keys, receiver.url(), status_record=False)
    async with running(client, keys):
        await wait_for(lambda: len(receiver.hits) == 1, 5)
        await wait_for(lambda: nothing_pending(client, keys), 5)
    assert await client.exists(keys.task(job.task_id)) == 0


async def test_unreadable_job_is_dead_lettered(client: Redis, keys: Keys) -> None:
    await client.xadd(keys.webhooks, {"type": "webhook.delivery", "data": b"{not json"})
    async with running(client, keys):
        dead = await wait_for(lambda: dead_letters(client, keys), 5)
    assert dead[0]["reason"] == "invalid_job"
    assert dead[0]["fields"]["data"] == "{not json"
    assert await nothing_pending(client, keys)


_CHILD = """
import asyncio, json, sys
from redis.asyncio import Redis
from sop_llm.handlers.webhooks import WebhookConfig, WebhookSender
from sop_llm.streams.keys import Keys
cfg = json.loads(sys.argv[1])
async def main():
    client = Redis.from_url(cfg.pop("redis_url"))
    keys = Keys(cfg.pop("namespace"))
    cfg["allow"] = tuple(cfg["allow"])
    sender = WebhookSender(client=client, keys=keys, config=WebhookConfig(**cfg))
    await sender.run(asyncio.Event())
asyncio.run(main())
"""


async def test_killed_sender_loses_nothing(
    client: Redis, keys: Keys, receiver: Receiver, redis_url: str
) -> None:
    receiver.script = ["hang", 200]
    job = await publish(client, keys, receiver.url())
    cfg = {
        "redis_url": redis_url, "namespace": keys.namespace, "consumer": "webhook-doomed",
        "allow": list(LOOPBACK), "lease_ttl_ms": 500, "block_ms": 50, "timeout_s": 10.0,
    }  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(cfg)], cwd=ROOT)
    try:
        await wait_for(lambda: len(receiver.hits) == 1, 10)  # the doomed sender is mid-delivery
        async with running(client, keys, reclaim_interval_ms=100):
            child.send_signal(signal.SIGKILL)
            status = await wait_for(lambda: settled(client, keys, job.task_id, "delivered"), 10)
            await wait_for(lambda: nothing_pending(client, keys), 5)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(10)
    assert status is not None and status.last_status_code == 200
    assert [h.headers["webhook-id"] for h in receiver.hits] == [job.delivery_id] * 2
    assert await dead_letters(client, keys) == []


async def test_build_sender_from_settings(client: Redis, redis_url: str) -> None:
    secret = new_secret()
    settings = Settings(
        redis_url=SecretStr(redis_url), webhook_secrets=SecretStr(f"{secret}, {new_secret()}"),
        webhook_schedule_s=("0", "1.5"), webhook_allow=("10.0.0.0/8",),
    )  # fmt: skip
    sender = build_sender(settings, client)
    assert sender.consumer.startswith("webhook-")
    bad = settings.model_copy(update={"webhook_secrets": SecretStr("hunter2")})
    with pytest.raises(ValueError, match="whsec_"):
        build_sender(bad, client)


async def test_several_senders_attempt_each_delivery_once_per_try(
    client: Redis, keys: Keys, receiver: Receiver
) -> None:
    receiver.script, receiver.per_delivery = [500, 204], True
    jobs = [await publish(client, keys, receiver.url()) for _ in range(20)]
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(3):
            await stack.enter_async_context(running(client, keys, schedule_s=(0, 0.05)))
        for job in jobs:
            await wait_for(lambda job=job: settled(client, keys, job.task_id, "delivered"), 10)
    seen = collections.Counter(h.headers["webhook-id"] for h in receiver.hits)
    assert seen == {job.delivery_id: 2 for job in jobs}
    assert await nothing_pending(client, keys)


async def test_redeliver_refuses_a_delivery_under_way_unless_forced(
    client: Redis, keys: Keys, receiver: Receiver, redis_url: str
) -> None:
    job = await publish(client, keys, receiver.url())  # pending: no sender has taken it yet
    settings = Settings(redis_url=SecretStr(redis_url), namespace=keys.namespace)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    busy = parser.parse_args(["webhooks", "redeliver", job.task_id])
    assert await run_command(settings, busy) == 1
    forced = parser.parse_args(["webhooks", "redeliver", job.task_id, "--force"])
    assert await run_command(settings, forced) == 0
    async with running(client, keys):
        await wait_for(lambda: len(receiver.hits) == 2, 5)
    assert {h.headers["webhook-id"] for h in receiver.hits} == {job.delivery_id}


async def test_an_unreadable_delayed_member_is_dead_lettered_not_dropped(
    client: Redis, keys: Keys
) -> None:
    await client.zadd(keys.webhooks_delayed, {"not a field list": 0})
    async with running(client, keys):
        dead = await wait_for(lambda: dead_letters(client, keys), 5)
    assert dead[0]["reason"] == "invalid_job"
    assert dead[0]["fields"]["data"] == "not a field list"


def test_retry_after_forms() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now) == 30.0
    assert parse_retry_after("Wed, 31 Dec 2025 00:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_decisions() -> None:
    schedule = (0.0, 5.0, 300.0)
    rng = random.Random(7)
    assert decide(from_response(204, None), 1, schedule).outcome == "delivered"
    assert decide(from_response(410, None), 1, schedule) == Decision("dead", reason="gone")
    retry = decide(from_response(503, None), 1, schedule, jitter=0.1, rng=rng)
    assert retry.outcome == "retry" and 5.0 <= retry.delay_s <= 5.5
    slow = decide(from_response(429, "60"), 1, schedule)
    assert slow.outcome == "retry" and slow.delay_s >= 60
    capped = decide(from_response(503, "999999"), 1, schedule, retry_after_cap_s=600)
    assert capped.delay_s == 600
    assert decide(from_response(500, None), 3, schedule) == Decision("dead", reason="exhausted")
    assert from_response(301, None).error == "redirect"
    assert from_exception(TimeoutError()).error == "timeout"
    assert from_exception(ConnectionResetError()).error == "connection"


async def test_a_schedule_starting_with_a_delay_defers_the_first_attempt(
    client: Redis, keys: Keys, receiver: Receiver
) -> None:
    receiver.script = [500, 200]
    published = time.monotonic()
    job = await publish(client, keys, receiver.url())
    async with running(client, keys, schedule_s=(0.3, 0.1)):
        status = await wait_for(lambda: settled(client, keys, job.task_id, "delivered"), 5)
    first, second = receiver.hits
    assert first.at - published >= 0.3
    assert second.at - first.at >= 0.1
    assert status is not None and status.attempts == 2


async def test_the_sender_rides_out_a_redis_restart(
    private_redis: RedisServer, namespace: str, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    client = Redis.from_url(private_redis.url, socket_timeout=2, socket_connect_timeout=1)
    keys = Keys(namespace)
    try:
        async with running(client, keys) as sender:
            first = await publish(client, keys, receiver.url())
            await wait_for(lambda: settled(client, keys, first.task_id, "delivered"), 5)
            private_redis.stop()  # every loop meets refused connections until it is back
            await wait_for(lambda: "redis unavailable, retrying" in caplog.messages, 5)
            private_redis.start()  # empty: the stream and its group are gone too
            second = await publish(client, keys, receiver.url())
            await wait_for(lambda: settled(client, keys, second.task_id, "delivered"), 10)
            assert sender.inflight == 0
    finally:
        await client.aclose()


async def test_a_refusal_from_redis_never_ends_the_sender(
    client: Redis, keys: Keys, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    def refused(loop: str) -> bool:
        return any(r.message == f"webhook {loop} loop error" for r in caplog.records)

    async with running(client, keys, reclaim_interval_ms=50) as sender:
        await wait_for(lambda: client.exists(keys.worker(sender.consumer)), 5)
        # the stream replaced by a string: every read and reclaim is answered WRONGTYPE
        await client.delete(keys.webhooks)
        await client.set(keys.webhooks, "not a stream")
        await wait_for(lambda: refused("consume") and refused("reclaim"), 5)
        await client.delete(keys.webhooks)  # repaired: the sender creates its group again
        job = await publish(client, keys, receiver.url())
        await wait_for(lambda: settled(client, keys, job.task_id, "delivered"), 10)
