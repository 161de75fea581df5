"""One trace from publish to the webhook receiver; /metrics parses and matches XINFO."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from redis.asyncio import Redis

from sop_llm.handlers.metrics import Metrics
from sop_llm.handlers.webhooks import WebhookConfig, WebhookSender
from sop_llm.ops.settings import Settings
from sop_llm.ops.sidecar import Sidecar
from sop_llm.streams.keys import TASK_GROUP, Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.conftest import wait_for
from tests.harness import running_worker


@contextlib.asynccontextmanager
async def receiver() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    seen: list[dict[str, str]] = []

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        seen.append(dict(request.headers))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/hook", seen
    finally:
        await runner.cleanup()


async def test_one_trace_from_publish_to_webhook_receiver(client: Redis, keys: Keys) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    p = Producer(
        ProducerConfig(namespace=keys.namespace, webhook_allow=("127.0.0.1",)),
        client=client,
        tracer=tracer,
    )
    sender = WebhookSender(
        client=client,
        keys=keys,
        tracer=tracer,
        config=WebhookConfig(consumer="webhook-t", allow=("127.0.0.1",), block_ms=100),
    )
    stop = asyncio.Event()
    async with receiver() as (url, seen), running_worker(client, keys, tracer=tracer):
        send = asyncio.create_task(sender.run(stop))
        try:
            task_id = await p.submit(
                "echo", "trace me", max_tokens=2, temperature=0, webhook_url=url
            )
            await wait_for(lambda: seen, 10)
        finally:
            stop.set()
            await asyncio.wait_for(send, 10)
    spans = exporter.get_finished_spans()
    trace_ids = {s.context.trace_id for s in spans}
    assert len(trace_ids) == 1, [(s.name, s.context.trace_id) for s in spans]
    (trace_id,) = trace_ids
    names = {s.name: s for s in spans}
    publish = names[f"publish {keys.tasks('default', 'normal')}"]
    process = names[f"process {keys.tasks('default', 'normal')}"]
    generate = names["text_completion echo"]
    deliver = names["webhook deliver"]
    assert publish.kind == SpanKind.PRODUCER and process.kind == SpanKind.CONSUMER
    assert process.parent is not None and process.parent.span_id == publish.context.span_id
    assert generate.parent is not None and generate.parent.span_id == process.context.span_id
    assert deliver.parent is not None and deliver.parent.span_id == process.context.span_id
    attrs = dict(generate.attributes or {})
    assert attrs["gen_ai.operation.name"] == "text_completion"
    assert attrs["gen_ai.provider.name"] == "echo"
    assert attrs["gen_ai.request.model"] == "echo"
    assert attrs["gen_ai.request.temperature"] == 0.0
    assert attrs["gen_ai.request.max_tokens"] == 2
    assert attrs["gen_ai.usage.input_tokens"] == 2 and attrs["gen_ai.usage.output_tokens"] == 2
    assert tuple(attrs["gen_ai.response.finish_reasons"]) == ("length",)  # type: ignore[arg-type]
    assert "gen_ai.input.messages" not in attrs  # content only when a setting opts in
    # the receiver got the trace too
    header = seen[0]["traceparent"]
    assert header.split("-")[1] == format(trace_id, "032x")
    assert dict(deliver.attributes or {})["sop.task_id"] == task_id


async def test_metrics_parse_and_queue_figures_match_xinfo(
    client: Redis, keys: Keys, redis_url: str
) -> None:
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    metrics = Metrics()
    async with running_worker(client, keys, metrics=metrics):
        done = await p.submit("echo", "a b c", max_tokens=4)
        await p.wait(done, timeout=5)
    for i in range(4):
        await p.submit("echo", f"waiting {i}", priority="low")
    low = keys.tasks("default", "low")
    await client.xreadgroup(TASK_GROUP, "someone", {low: ">"}, count=1)
    settings = Settings(redis_url=SecretStr(redis_url), namespace=keys.namespace, sidecar_port=0)
    side = Sidecar(client=client, settings=settings, metrics=metrics)
    async with (
        side.running(),
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{side.port}/metrics") as r,
    ):
        assert r.status == 200
        body = await r.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    [group] = await client.xinfo_groups(low)
    where = (("partition", "low"), ("pool", "default"))
    assert samples[("sop_queue_depth", where)] == await client.xlen(low) == 4
    assert samples[("sop_queue_lag", where)] == group["lag"] == 3
    assert samples[("sop_queue_pending", where)] == group["pending"] == 1
    assert samples[("sop_queue_oldest_pending_age_seconds", where)] >= 0
    assert samples[("sop_task_outcomes_total", (("state", "completed"),))] == 1
    assert samples[("sop_tokens_total", (("direction", "output"), ("model", "echo")))] == 4
    assert samples[("sop_tasks_inflight", ())] == 0
