"""The AsyncAPI document: current on disk, well formed, and true to what a real worker writes."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from jsonschema import Draft202012Validator, ValidationError
from redis.asyncio import Redis

from sop_llm.ops.asyncapi import asyncapi_document, render
from sop_llm.schemas.wire import FIELD_DATA, FIELD_TYPE, EventType
from sop_llm.streams.control import CancelOutcome
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.conftest import ROOT, wait_for
from tests.harness import running_worker, stream_entries, xadd_task
from tests.ops.docschema import refs, resolve, validate


def _doc(namespace: str = "sop") -> dict[str, Any]:
    return asyncapi_document(namespace)


def _message_for(doc: dict[str, Any], channel: str, type_: str) -> str:
    """The pointer of the message of ``channel`` whose ``type`` field is ``type_``."""
    for name, msg in doc["channels"][channel]["messages"].items():
        if resolve(doc, msg["$ref"])["payload"]["properties"][FIELD_TYPE]["const"] == type_:
            return f"#/components/messages/{name}"
    raise AssertionError(f"no {type_!r} message on channel {channel!r}")


def _check_entry(doc: dict[str, Any], channel: str, fields: dict[str, str]) -> None:
    """An entry as read from Redis satisfies its message: the fields, then the JSON in data."""
    message = _message_for(doc, channel, fields[FIELD_TYPE])
    validate(doc, f"{message}/payload", fields)
    data_ref = resolve(doc, message)["payload"]["properties"][FIELD_DATA]["contentSchema"]["$ref"]
    validate(doc, data_ref, json.loads(fields[FIELD_DATA]))


def test_asyncapi_doc_is_current() -> None:
    current = (ROOT / "docs" / "asyncapi.json").read_text()
    assert current == render(), "regenerate: python -m sop_llm.ops.asyncapi docs/asyncapi.json"


def test_document_structure() -> None:
    doc = _doc()
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] and doc["info"]["version"]
    assert set(doc["channels"]) == {
        "tasks", "results", "replyResults", "webhooks", "webhooksDead", "control", "dead",
        "taskTokens",
    }  # fmt: skip
    for name, channel in doc["channels"].items():
        assert channel["messages"], f"channel {name} has no message"
        used = set(re.findall(r"\{([^}]+)\}", channel["address"]))
        assert used == set(channel.get("parameters", {})), f"{name}: parameters != address"
    for op_id, op in doc["operations"].items():
        assert op["action"] in ("send", "receive")
        channel_ref = op["channel"]["$ref"]
        resolve(doc, channel_ref)
        for msg in op["messages"]:
            assert msg["$ref"].startswith(channel_ref + "/messages/"), f"{op_id}: foreign message"


def test_every_reference_resolves() -> None:
    doc = _doc()
    found = set(refs(doc))
    assert "#/components/schemas/TaskEvent" in found
    for ref in found:
        resolve(doc, ref)


def test_payload_schemas_are_valid_json_schemas() -> None:
    doc = _doc()
    for schema in doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    for msg in doc["components"]["messages"].values():
        Draft202012Validator.check_schema(msg["payload"])


def test_the_examples_satisfy_their_messages() -> None:
    doc = _doc()
    for name, msg in doc["components"]["messages"].items():
        [example] = msg["examples"]
        channel = next(
            c for c, ch in doc["channels"].items()
            if f"#/components/messages/{name}" in [m["$ref"] for m in ch["messages"].values()]
        )  # fmt: skip
        _check_entry(doc, channel, example["payload"])


def test_every_event_type_has_a_message() -> None:
    doc = _doc()
    documented = {
        msg["payload"]["properties"][FIELD_TYPE]["const"]
        for msg in doc["components"]["messages"].values()
    }
    assert {t.value for t in EventType} <= documented


def test_addresses_are_the_namespaces_keys() -> None:
    doc = _doc("tenant1")
    keys = Keys("tenant1")
    [prefix] = doc["components"]["parameters"]["tenant1"]["enum"]
    assert prefix == keys.prefix == "{tenant1}"

    def address(channel: str, **params: str) -> str:
        return str(doc["channels"][channel]["address"].format(tenant1=prefix, **params))

    assert address("tasks", pool="gpu", priority="high") == keys.tasks("gpu", "high")
    assert address("results") == keys.results
    assert address("replyResults", reply_to="billing") == keys.results_for("billing")
    assert address("webhooks") == keys.webhooks
    assert address("webhooksDead") == keys.webhooks_dead
    assert address("control") == keys.control
    assert address("dead") == keys.dead
    assert address("taskTokens", task_id="t-1") == keys.task_tokens("t-1")


async def test_what_a_worker_writes_matches_the_document(client: Redis, keys: Keys) -> None:
    doc = _doc(keys.namespace)
    producer = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    done = await producer.submit(
        "echo", "one two three", max_tokens=3, reply_to="billing", stream=True,
        webhook_url="https://example.com/hook", metadata={"order": 7},
    )  # fmt: skip
    await xadd_task(client, keys, {"task_id": "bad-1", "model": "echo", "prompt": "x", "top_p": 3})
    async with running_worker(client, keys, tokens_per_s=20):
        await producer.wait(done, timeout=10)
        slow = await producer.submit("echo", "slow words here", max_tokens=200)
        await wait_for(lambda: _running(producer, slow), timeout=10)
        assert await producer.cancel(slow) == CancelOutcome.REQUESTED
        await producer.wait(slow, timeout=10)
        await producer.wait("bad-1", timeout=10)

    written = {
        "tasks": [keys.tasks("default", p) for p in ("high", "normal", "low")],
        "results": [keys.results],
        "replyResults": [keys.results_for("billing")],
        "webhooks": [keys.webhooks],
        "control": [keys.control],
        "dead": [keys.dead],
        "taskTokens": [keys.task_tokens(done)],
    }
    seen: dict[str, set[str]] = {}
    for channel, streams in written.items():
        for stream in streams:
            for entry in await stream_entries(client, stream):
                fields = {k: v.decode() for k, v in entry.fields.items()}
                if '"bad-1"' in fields[FIELD_DATA] and channel == "tasks":
                    # the schema refuses what the worker refused
                    with pytest.raises(ValidationError, match="top_p"):
                        _check_entry(doc, channel, fields)
                    continue
                _check_entry(doc, channel, fields)
                seen.setdefault(channel, set()).add(fields[FIELD_TYPE])
    assert seen == {
        "tasks": {"task.submitted"},
        "results": {"task.completed", "task.cancelled", "task.failed"},
        "replyResults": {"task.completed"},
        "webhooks": {"webhook.delivery"},
        "control": {"task.cancel"},
        "dead": {"task.dead"},
        "taskTokens": {"token.delta", "token.end"},
    }


async def _running(producer: Producer, task_id: str) -> bool:
    record = await producer.status(task_id)
    return record is not None and record.state == "running"
