"""The composition root: builds clients, the registry, the worker and the sidecar from Settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable

from opentelemetry import trace
from prometheus_client import start_http_server
from pydantic import SecretStr
from redis.asyncio import Redis
from redis.exceptions import RedisError

from sop_llm.handlers.metrics import Metrics
from sop_llm.handlers.policy import RetryPolicy
from sop_llm.handlers.tasks import Worker, WorkerConfig
from sop_llm.handlers.tasks.gpu import GpuGate
from sop_llm.ops.connect import redis_client_for, target_for, wait_for_redis
from sop_llm.ops.embedded import embedded_redis
from sop_llm.ops.gpu_setup import build_gpu_runtime
from sop_llm.ops.settings import Settings
from sop_llm.ops.sidecar import Sidecar
from sop_llm.ops.telemetry import tracing
from sop_llm.ops.webhook_setup import build_sender
from sop_llm.providers.echo import EchoProvider
from sop_llm.providers.loader import ModelLoader
from sop_llm.providers.registry import ModelRegistry
from sop_llm.providers.specs import load_specs_file, merge_specs
from sop_llm.schemas.models import ModelSpec
from sop_llm.streams.errors import INCIDENTS
from sop_llm.streams.keys import Keys
from sop_llm.streams.models import ModelStore
from sop_llm.streams.retention import Retention
from sop_llm.streams.topology import Backoff
from sop_llm.streams.urlguard import AllowList

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def model_registry(
    settings: Settings,
    client: Redis | None = None,
    on_retire: Callable[[str], None] | None = None,
) -> AsyncIterator[tuple[ModelRegistry, ModelLoader, list[ModelSpec]]]:
    """The models this process serves: the built-in ``echo``, the ``SOP_MODELS_FILE`` specs
    (a bad file fails start-up) and, with a client, those registered at run time in Redis
    (runtime specs win over the file's). Providers are closed on exit; ``on_retire`` hears of
    each one closed at run time."""
    registry = ModelRegistry()
    registry.register(
        "echo", EchoProvider(tokens_per_s=settings.echo_tokens_per_s, slots=settings.echo_slots)
    )
    file_specs = load_specs_file(settings.models_file) if settings.models_file else []
    async with ModelLoader(
        registry=registry, env=os.environ, pools=settings.pools,
        echo_tokens_per_s=settings.echo_tokens_per_s, on_retire=on_retire,
    ) as loader:  # fmt: skip
        await loader.apply(file_specs, strict=True)
        if client is not None:
            snapshot = await ModelStore(client=client, keys=Keys(settings.namespace)).snapshot()
            if snapshot.specs:
                report = await loader.apply(merge_specs(file_specs, list(snapshot.specs)))
                log.info("models loaded", extra={"report": str(report)})
        yield registry, loader, file_specs


async def watch_models(
    settings: Settings,
    client: Redis,
    loader: ModelLoader,
    file_specs: list[ModelSpec],
    stop: asyncio.Event,
    worker: Worker | None = None,
) -> None:
    """Apply model specs registered at run time (`sop-llm models add|remove`) without a restart;
    the ``worker`` is told each version it took."""
    store = ModelStore(client=client, keys=Keys(settings.namespace))
    backoff = Backoff(base=0.5, cap=30.0)
    while not stop.is_set():
        try:
            async for snapshot in store.changes(stop, interval_s=settings.models_poll_s):
                report = await loader.apply(merge_specs(file_specs, list(snapshot.specs)))
                if report.changed:
                    log.info("models changed", extra={"report": str(report)})
                if worker is not None:
                    await worker.models_changed(snapshot.version)
                backoff.reset()
        except (RedisError, OSError, TimeoutError) as exc:
            if backoff.failures == 0:
                log.warning("model registry unreadable, retrying", extra={"error": repr(exc)})
            await backoff.sleep(stop)


def build_worker(
    settings: Settings,
    client: Redis,
    registry: ModelRegistry,
    metrics: Metrics | None = None,
    gpu: GpuGate | None = None,
) -> Worker:
    config = WorkerConfig(
        consumer=settings.consumer_name(),
        pools=settings.pools,
        partitions=settings.partitions,
        slots=settings.worker_slots,
        block_ms=settings.block_ms,
        aging_ms=settings.aging_ms,
        lease_ttl_ms=settings.lease_ttl_ms,
        reclaim_interval_ms=settings.reclaim_interval_ms,
        unknown_model_grace_s=settings.unknown_model_grace_s,
        max_attempts=settings.max_attempts,
        status_ttl_s=settings.status_ttl_s,
        max_prompt_bytes=settings.max_prompt_bytes,
        max_metadata_bytes=settings.max_metadata_bytes,
        max_entry_bytes=settings.max_entry_bytes,
        webhook_allow=AllowList.parse(settings.webhook_allow),
        durability=settings.durability(),
        shutdown_grace_s=settings.shutdown_grace_s,
        retry_poll_ms=settings.retry_poll_ms,
        retry=RetryPolicy(base_s=settings.retry_base_s, max_s=settings.retry_max_s),
        retention=Retention(
            tasks_ms=settings.retention_s * 1000,
            results_ms=settings.results_retention_s * 1000,
            dead_ms=settings.dead_retention_s * 1000,
        ),
        trim_interval_s=settings.trim_interval_s,
        trace_content=settings.trace_content,
    )
    # no exporter: no spans at all (OpenTelemetry's no-op spans still cost per task)
    tracer = trace.get_tracer("sop_llm.worker") if settings.otel_exporter != "none" else None
    return Worker(
        client=client, keys=Keys(settings.namespace), registry=registry, config=config,
        tracer=tracer, metrics=metrics, gpu=gpu,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def resolved_redis(settings: Settings, *, allow_embedded: bool) -> AsyncIterator[Settings]:
    """Settings with a Redis URL: the configured one, or an embedded server's."""
    if settings.redis_sentinels or settings.redis_url is not None or not allow_embedded:
        target_for(settings)  # raises a clear ValueError when unset or contradictory
        yield settings
        return
    async with embedded_redis(settings.data_dir) as url:
        print(  # noqa: T201 - the user must see where the embedded Redis listens
            f"sop-llm: no SOP_REDIS_URL set; embedded Redis at {url} (data in {settings.data_dir})",
            flush=True,
        )
        yield settings.model_copy(update={"redis_url": SecretStr(url)})


async def serve(
    settings: Settings,
    stop: asyncio.Event,
    *,
    worker: bool,
    sidecar: bool,
    allow_embedded: bool = False,
) -> None:
    """Run the worker and/or the sidecar until ``stop`` is set; resources close in reverse order."""
    async with contextlib.AsyncExitStack() as stack:
        settings = await stack.enter_async_context(
            resolved_redis(settings, allow_embedded=allow_embedded)
        )
        target = target_for(settings).describe()  # no password in it
        log.info("connecting", extra={"redis": target, "namespace": settings.namespace})
        INCIDENTS.target = target
        stack.enter_context(tracing(settings))
        client = redis_client_for(settings)
        stack.push_async_callback(client.aclose)
        metrics = Metrics()
        side = None
        if sidecar:
            # probes are answered from the start: live, and not ready while Redis is away
            side = Sidecar(client=client, settings=settings, metrics=metrics, with_worker=worker)
            await stack.enter_async_context(side.running())
        # a process started while Redis is away waits for it (a crash loop would not help)
        if not await wait_for_redis(
            client, stop=stop, timeout_s=settings.startup_timeout_s, target=target
        ):
            return
        gpus = await build_gpu_runtime(settings, client)
        # a model removed or replaced at run time no longer counts as loaded on its device
        forget = gpus.admission.forget if gpus.admission is not None else None
        models = await stack.enter_async_context(model_registry(settings, client, forget))
        registry, loader, file_specs = models
        the_worker = None
        if worker:
            the_worker = build_worker(
                settings,
                client,
                registry,
                metrics,
                GpuGate(
                    semaphores=gpus.semaphores,
                    partitions=settings.partitions,
                    admission=gpus.admission,
                    loader=gpus.loader,
                ),
            )
            if not sidecar and settings.metrics_port is not None:
                # a worker without a sidecar still exposes its own metrics
                start_http_server(
                    settings.metrics_port, addr=settings.sidecar_host, registry=metrics.registry
                )
        sender = None
        if worker and settings.webhook_sender:
            sender = build_sender(settings, client, metrics)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(gpus.run(stop))  # VRAM sampling and idle-model unloading
            if worker:
                tg.create_task(watch_models(settings, client, loader, file_specs, stop, the_worker))
            if sender is not None:
                tg.create_task(sender.run(stop))
            if side is not None:
                side.attach(worker=the_worker, gpu=gpus)
            if the_worker is not None:
                tg.create_task(the_worker.run(stop))
            await stop.wait()
