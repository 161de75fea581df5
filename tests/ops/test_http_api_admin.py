"""The sidecar's HTTP API for operators: the views (true to Redis), dead letters, webhook
redeliveries and the model registry. Every answer is checked against the document."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from sop_llm.providers.echo import EchoProvider
from sop_llm.schemas.result import WebhookJob
from sop_llm.streams import keys as k
from sop_llm.streams.keys import TASK_GROUP, Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from sop_llm.streams.webhook_store import AttemptRecord, WebhookDeadLetter
from tests.conftest import wait_for
from tests.harness import echo_registry, running_worker, wait_results, xadd_task
from tests.ops.apicheck import Api, serving


@pytest.fixture
async def api(client: Redis, redis_url: str, namespace: str) -> AsyncIterator[Api]:
    async with serving(client, redis_url, namespace) as found:
        yield found


async def test_the_overview_and_inflight_match_redis(api: Api, client: Redis, keys: Keys) -> None:
    producer = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    slow = [await producer.submit("echo", "a b", max_tokens=400, priority="high") for _ in range(2)]
    async with running_worker(client, keys, tokens_per_s=20, shutdown_grace_s=0.5):
        await wait_for(lambda: _xpending(client, keys.tasks("default", "high"), 2), 10)
        overview = await api.call("GET", "/v1/overview", "/v1/overview", 200)
        inflight = await api.call("GET", "/v1/inflight", "/v1/inflight", 200)
        for task_id in slow:
            await producer.cancel(task_id)
    rows = {row["partition"]: row for row in overview["partitions"]}
    high = rows["high"]
    assert high["pending"] == 2 and high["length"] == 2 and high["entries_added"] == 2
    assert high["lag"] == 0 and high["oldest_waiting_age_ms"] is None
    assert high["oldest_pending_age_ms"] is not None and high["consumers"] == 1
    assert rows["low"]["entries_added"] == rows["low"]["length"] == 0
    [worker] = overview["workers"]
    assert worker["consumer"] == "w1" and worker["pools"] == ["default"]
    assert worker["models"] == ["echo"] and worker["held"] >= 2
    assert worker["lease_ttl_ms"] is not None and worker["lease_ttl_ms"] > 0
    running = {t["task_id"]: t for t in inflight["tasks"]}
    assert set(slow) <= set(running)
    assert all(running[t]["state"] == "running" and running[t]["consumer"] == "w1" for t in slow)
    assert {running[t]["partition"] for t in slow} == {"high"}


async def _xpending(client: Redis, stream: str, count: int) -> bool:
    try:
        return int((await client.xpending(stream, TASK_GROUP))["pending"]) >= count
    except Exception:  # noqa: BLE001 - the group may not exist yet
        return False


async def test_oldest_waiting_age_counts_undelivered_entries(
    api: Api, client: Redis, keys: Keys
) -> None:
    stream = keys.tasks("default", "normal")
    await client.xgroup_create(stream, TASK_GROUP, id="0", mkstream=True)
    old = int(time.time() * 1000) - 5000
    await client.xadd(stream, {"type": "task.submitted", "data": "{}"}, id=f"{old}-0")
    await client.xadd(stream, {"type": "task.submitted", "data": "{}"})
    overview = await api.call("GET", "/v1/overview", "/v1/overview", 200)
    [row] = [r for r in overview["partitions"] if r["partition"] == "normal"]
    assert row["lag"] == 2 and row["oldest_waiting_age_ms"] >= 5000
    await client.xreadgroup(TASK_GROUP, "someone", {stream: ">"}, count=1)
    overview = await api.call("GET", "/v1/overview", "/v1/overview", 200)
    [row] = [r for r in overview["partitions"] if r["partition"] == "normal"]
    assert row["lag"] == 1 and row["oldest_waiting_age_ms"] < 5000
    assert row["pending"] == 1 and row["oldest_pending_age_ms"] >= 5000


async def test_recent_outcomes_filter(api: Api, client: Redis, keys: Keys) -> None:
    producer = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    done = await producer.submit("echo", "fine", max_tokens=1)
    cancelled = await producer.submit("echo", "never")
    await producer.cancel(cancelled)
    async with running_worker(client, keys):
        await producer.wait(done, timeout=10)
    await client.xadd(keys.results, {"type": "task.completed", "data": "not json"})
    found = await api.call("GET", "/v1/results", "/v1/results", 200)
    assert [r["task_id"] for r in found["results"]] == [done, cancelled]  # newest first
    assert found["length"] == 3
    only = await api.call("GET", "/v1/results?state=cancelled", "/v1/results", 200)
    assert [r["task_id"] for r in only["results"]] == [cancelled]
    one = await api.call("GET", f"/v1/results?task_id={done}&count=1", "/v1/results", 200)
    assert one["results"][0]["text"] == "fine"
    none = await api.call("GET", "/v1/results?model=other", "/v1/results", 200)
    assert none["results"] == []


async def test_dead_letters_are_listed_requeued_and_purged(
    api: Api, client: Redis, keys: Keys
) -> None:
    registry = echo_registry()
    async with running_worker(client, keys, registry=registry, unknown_model_grace_s=0.0):
        await xadd_task(
            client, keys, {"task_id": "late-1", "model": "later", "prompt": "x y", "max_tokens": 2}
        )
        await xadd_task(client, keys, {"task_id": "bad-1", "model": "echo"})  # no prompt
        await xadd_task(client, keys, {"task_id": "bad-2", "model": "echo"})
        await wait_results(client, keys, 3)
        listed = await api.call("GET", "/v1/dead", "/v1/dead", 200)
        assert listed["length"] == 3 and listed["unreadable"] == 0
        by_task = {d["task_id"]: d for d in listed["letters"]}
        assert by_task["late-1"]["reason"] == "model_not_found"
        assert by_task["late-1"]["model"] == "later"
        assert by_task["bad-1"]["reason"] == "invalid_event"
        only = await api.call("GET", "/v1/dead?reason=invalid_event", "/v1/dead", 200)
        assert {d["task_id"] for d in only["letters"]} == {"bad-1", "bad-2"}
        history = await api.call(
            "GET", "/v1/tasks/late-1/history", "/v1/tasks/{task_id}/history", 200
        )
        assert [d["id"] for d in history["dead_letters"]] == [by_task["late-1"]["id"]]
        # the model arrives: requeued, the task runs to completion
        registry.register("later", EchoProvider())
        requeued = await api.call(
            "POST",
            "/v1/dead/requeue",
            "/v1/dead/requeue",
            200,
            body={"ids": [by_task["late-1"]["id"], "1-1"]},
        )
        assert [r["task_id"] for r in requeued["requeued"]] == ["late-1"]
        assert requeued["missing"] == ["1-1"] and requeued["failed"] == []
        result = await Producer(ProducerConfig(namespace=keys.namespace), client=client).wait(
            "late-1", timeout=10
        )
        assert result.state == "completed" and result.text == "x y"
    gone = await api.call(
        "POST", "/v1/dead/requeue", "/v1/dead/requeue", 404, body={"ids": [by_task["late-1"]["id"]]}
    )
    assert gone["error"] == "not_found"
    purged = await api.call(
        "POST",
        "/v1/dead/purge",
        "/v1/dead/purge",
        200,
        body={"reason": "invalid_event", "task_id": "bad-1"},
    )
    assert purged["purged"] == 1
    assert [
        d["task_id"] for d in (await api.call("GET", "/v1/dead", "/v1/dead", 200))["letters"]
    ] == ["bad-2"]
    assert (await api.call("POST", "/v1/dead/purge", "/v1/dead/purge", 200, body={"all": True}))[
        "purged"
    ] == 1
    assert await client.xlen(keys.dead) == 0


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "selection_required"),
        ({"all": False}, "selection_required"),
        ({"ids": None}, "invalid_body"),
        ({"ids": []}, "invalid_body"),
        ({"ids": ["not-an-id"]}, "invalid_body"),
        ({"task_id": ""}, "invalid_body"),
        ({"reason": "no_such_reason"}, "invalid_body"),
        ({"all": "yes"}, "invalid_body"),
        ({"everything": True}, "invalid_body"),
    ],
)
async def test_a_dead_letter_selection_is_checked(
    api: Api, client: Redis, keys: Keys, body: dict[str, object], code: str
) -> None:
    await client.xadd(keys.dead, {"type": "task.dead", "data": "{}"})  # unreadable: untouched
    for path in ("/v1/dead/requeue", "/v1/dead/purge"):
        assert (await api.call("POST", path, path, 422, body=body))["error"] == code
    assert await client.xlen(keys.dead) == 1
    assert (await api.call("GET", "/v1/dead", "/v1/dead", 200))["unreadable"] == 1


def _job(task_id: str) -> WebhookJob:
    from sop_llm.schemas.result import TaskResult, TaskState

    result = TaskResult(task_id=task_id, state=TaskState.COMPLETED, finished_at=1)
    return WebhookJob(
        delivery_id=f"d-{task_id}",
        task_id=task_id,
        url="https://hooks.example.com/x",
        event="task.completed",
        payload=result,
        created_at=1,
    )


async def test_webhook_redelivery(api: Api, client: Redis, keys: Keys) -> None:
    producer = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    task_id = await producer.submit("echo", "hook", webhook_url="https://hooks.example.com/x")
    async with running_worker(client, keys):
        await producer.wait(task_id, timeout=10)
    path, template = f"/v1/webhooks/{task_id}/redeliver", "/v1/webhooks/{task_id}/redeliver"
    # no sender ran: its delivery is still pending, so a second one needs force
    assert (await api.call("POST", path, template, 409))["error"] == "busy"
    assert (await api.call("POST", path + "?force=maybe", template, 400))["error"] == (
        "invalid_parameter"
    )
    again = await api.call("POST", path + "?force=true", template, 202)
    assert again["from_dead"] is False and again["task_id"] == task_id
    assert (await api.call("POST", "/v1/webhooks/nobody/redeliver", template, 404))[
        "error"
    ] == "not_found"
    # a dead delivery: listed, then sent again from the dead letters
    letter = WebhookDeadLetter(
        reason="exhausted",
        delivery_id="d-dead",
        task_id="dead-1",
        url="https://hooks.example.com/x",
        attempts=[AttemptRecord(at=5, status=503)],
        source_stream=keys.webhooks,
        entry_id="1-0",
        job=_job("dead-1"),
        dead_at=10,
    )
    await client.xadd(
        keys.webhooks_dead, {"type": "webhook.dead", "data": letter.model_dump_json()}
    )
    await client.xadd(keys.webhooks_dead, {"type": "webhook.dead", "data": "garbage"})
    listed = await api.call("GET", "/v1/webhooks/dead", "/v1/webhooks/dead", 200)
    assert listed["length"] == 2 and listed["letters"][0] == {
        "id": listed["letters"][0]["id"],
        "readable": False,
    }
    row = listed["letters"][1]
    assert row["task_id"] == "dead-1" and row["last_attempt"] == {
        "at": 5,
        "status": 503,
        "error": None,
    }
    done = await api.call("POST", "/v1/webhooks/dead-1/redeliver", template, 202)
    assert done["from_dead"] is True
    assert await client.xlen(keys.webhooks_dead) == 1


async def test_models_are_registered_read_and_removed(api: Api, client: Redis, keys: Keys) -> None:
    spec = {
        "name": "org/qwen",
        "provider": "openai_compatible",
        "model_id": "qwen",
        "base_url": "http://127.0.0.1:9/v1",
        "concurrency": 2,
    }
    made = await api.call("POST", "/v1/models", "/v1/models", 201, body=spec)
    assert api.last_headers["Location"] == "/v1/models/org%2Fqwen"
    again = await api.call("POST", "/v1/models", "/v1/models", 200, body={**spec, "concurrency": 3})
    assert again["version"] == made["version"] + 1
    got = await api.call("GET", "/v1/models/org/qwen", "/v1/models/{name}", 200)
    assert got["concurrency"] == 3 and got["base_url"] == spec["base_url"]
    async with running_worker(client, keys):
        listed = await api.call("GET", "/v1/models", "/v1/models", 200)
    assert [s["name"] for s in listed["specs"]] == ["org/qwen"]
    assert listed["builtin"] == ["echo"] and listed["served"] == {"echo": ["w1"]}
    await client.hset(keys.models, "broken", "{not a spec")
    assert (await api.call("GET", "/v1/models/broken", "/v1/models/{name}", 409))["error"] == (
        "invalid_spec"
    )
    assert "broken" in (await api.call("GET", "/v1/models", "/v1/models", 200))["invalid"]
    removed = await api.call("DELETE", "/v1/models/org/qwen", "/v1/models/{name}", 200)
    assert removed == {"name": "org/qwen", "version": again["version"] + 1}
    for method in ("GET", "DELETE"):
        await api.call(method, "/v1/models/org/qwen", "/v1/models/{name}", 404)
        await api.call(method, "/v1/models/%2F..", "/v1/models/{name}", 404)


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "m", "provider": "openai"},  # no model_id
        {"name": "m", "provider": "echo", "concurrency": "4"},  # a string is no number
        {"name": "m", "provider": "echo", "n_gpu_layers": False},  # nor is a boolean
        {"name": "m", "provider": "llama_cpp"},  # no path
        {"name": "m", "provider": "echo", "base_url": "ftp://x"},
        {"name": "m", "provider": "echo", "colour": "blue"},
        {"name": "-m", "provider": "echo"},
    ],
)
async def test_a_bad_model_spec_is_a_422(
    api: Api, client: Redis, keys: Keys, spec: dict[str, object]
) -> None:
    assert (await api.call("POST", "/v1/models", "/v1/models", 422, body=spec))["error"] == (
        "invalid_spec"
    )
    assert await client.hlen(keys.models) == 0


async def test_a_task_history_has_its_earlier_errors(api: Api, client: Redis, keys: Keys) -> None:
    producer = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    task_id = await producer.submit("echo", "x")
    errors = [{"code": "rate_limited", "message": "429 from the backend"}]
    await client.hset(keys.task(task_id), k.F_ERRORS, json.dumps(errors))
    history = await api.call(
        "GET", f"/v1/tasks/{task_id}/history", "/v1/tasks/{task_id}/history", 200
    )
    assert history == {"errors": errors, "dead_letters": [], "webhook_dead_letters": []}
    await client.hset(keys.task(task_id), k.F_ERRORS, "[{]")
    broken = await api.call(
        "GET", f"/v1/tasks/{task_id}/history", "/v1/tasks/{task_id}/history", 200
    )
    assert broken["errors"] == []
    await api.call("GET", "/v1/tasks/unknown/history", "/v1/tasks/{task_id}/history", 404)
