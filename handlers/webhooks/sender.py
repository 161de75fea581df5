"""The webhook sender: delivers task outcomes from ``{ns}:webhooks`` by signed HTTP POST.

Like the task worker it pulls only when it has a free slot (``concurrency`` deliveries at once),
keeps a lease (``{ns}:worker:webhook-...``) and reclaims the entries of senders whose lease
expired, so a killed sender loses nothing. No sender waits on a delivery: a failed attempt is
settled at once (see :mod:`streams.webhook_store`) and its retry waits in the delayed set until
a promoter loop, running in every sender, moves it back to the stream when due.

Passing Redis trouble (``streams.errors.TRANSIENT_ERRORS``) is retried with backoff by every
loop here; anything else Redis answers is a bug or a misconfiguration, logged with its
traceback by the loop's guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from urllib.parse import urlsplit

import aiohttp
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from pydantic import ValidationError

from sop_llm.handlers.clock import now_ms
from sop_llm.handlers.logctx import bind
from sop_llm.handlers.metrics import Metrics
from sop_llm.handlers.webhooks.config import WebhookConfig
from sop_llm.handlers.webhooks.payload import build_body
from sop_llm.handlers.webhooks.policy import (
    E_INVALID_JOB,
    E_PAYLOAD_TOO_LARGE,
    AttemptResult,
    decide,
    from_exception,
    from_response,
)
from sop_llm.handlers.webhooks.settlement import dead_settlement, deferral, settlement_after
from sop_llm.handlers.webhooks.signing import Signer
from sop_llm.handlers.webhooks.ssrf import GuardedResolver, system_lookup
from sop_llm.schemas.result import WebhookJob
from sop_llm.streams.cancellation import raise_if_cancelled
from sop_llm.streams.client import RedisClient
from sop_llm.streams.entries import Entry
from sop_llm.streams.errors import TRANSIENT_ERRORS, describe
from sop_llm.streams.keys import WEBHOOK_GROUP, Keys
from sop_llm.streams.leases import Lease, Reclaimer
from sop_llm.streams.topology import Backoff
from sop_llm.streams.tracecontext import context_from, current_traceparent
from sop_llm.streams.urlguard import AllowList, Lookup, check_webhook_url
from sop_llm.streams.webhook_store import (
    F_ATTEMPT_LOG,
    AttemptRecord,
    Settlement,
    WebhookStore,
    parse_attempt_log,
)

log = logging.getLogger(__name__)

_PROMOTE_BATCH = 100


class WebhookSender:
    def __init__(
        self,
        *,
        client: RedisClient,
        keys: Keys,
        config: WebhookConfig,
        lookup: Lookup = system_lookup,
        tracer: Tracer | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """Raises ``ValueError`` for a malformed secret or allow-list entry."""
        self._tracer = tracer or trace.get_tracer("sop_llm.webhooks")
        self._metrics = metrics
        self._keys = keys
        self._config = config
        self._signer = Signer(config.secrets)
        self._allow = AllowList.parse(config.allow)
        self._lookup = lookup
        self._store = WebhookStore(client=client, keys=keys)
        self._lease = Lease(
            client=client, keys=keys, consumer=config.consumer, ttl_ms=config.lease_ttl_ms,
            info={"role": "webhook-sender", "slots": str(config.concurrency)},
        )  # fmt: skip
        self._reclaimer = Reclaimer(
            client=client, keys=keys, streams=[keys.webhooks], consumer=config.consumer,
            group=WEBHOOK_GROUP,
        )  # fmt: skip
        self._session: aiohttp.ClientSession | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._retry_parked = asyncio.Event()
        self._intake = asyncio.Lock()

    @property
    def consumer(self) -> str:
        return self._config.consumer

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def _free(self) -> int:
        return self._config.concurrency - len(self._inflight)

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set, then give in-flight deliveries ``shutdown_grace_s``;
        the rest stay pending (unacknowledged) for another sender."""
        if not await self._start_up(stop):
            return
        cfg = self._config
        resolver = GuardedResolver(allow=self._allow, lookup=self._lookup, timeout_s=cfg.timeout_s)
        # no DNS cache: every new connection is resolved and vetted by the guard
        connector = aiohttp.TCPConnector(
            resolver=resolver, use_dns_cache=False, limit=cfg.concurrency
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=cfg.timeout_s),
            cookie_jar=aiohttp.DummyCookieJar(), trust_env=False, auto_decompress=False,
            headers={"User-Agent": cfg.user_agent},
        )  # fmt: skip
        lease_stop = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                lease_task = tg.create_task(self._lease.run(lease_stop))
                tg.create_task(self._consume(stop, tg))
                tg.create_task(self._reclaim_loop(stop, tg))
                tg.create_task(self._promote_loop(stop))
                await stop.wait()
                await self._drain()
                lease_stop.set()
                await lease_task
        finally:
            await self._session.close()
            await self._lease.leave()

    async def _start_up(self, stop: asyncio.Event) -> bool:
        if not await self._lease.join([self._keys.webhooks], WEBHOOK_GROUP, stop):
            return False
        if not self._signer.active:
            log.warning("no webhook secrets configured: deliveries go out unsigned")
        log.info("webhook sender started", extra={"consumer": self.consumer})
        return True

    async def _drain(self) -> None:
        if not self._inflight:
            return
        _, pending = await asyncio.wait(set(self._inflight), timeout=self._config.shutdown_grace_s)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("grace over, deliveries left pending", extra={"count": len(pending)})
            await asyncio.wait(pending)

    async def _consume(self, stop: asyncio.Event, tg: asyncio.TaskGroup) -> None:
        backoff = Backoff(base=0.05, cap=2.0)
        while not stop.is_set():
            if self._free() <= 0:
                self._slot_freed.clear()
                await _first_of(stop, self._slot_freed)
                continue
            try:
                async with self._intake:
                    async with asyncio.timeout(self._config.block_ms / 1000 + 10):
                        entries = await self._store.read(
                            self.consumer, self._free(), self._config.block_ms
                        )
                    raise_if_cancelled()
                    self._admit(entries, tg, stop)
                backoff.reset()
            except TRANSIENT_ERRORS as exc:
                if backoff.failures == 0:
                    log.warning("redis unavailable, retrying", extra={"error": describe(exc)})
                await backoff.sleep(stop)
            except Exception:
                # the consume loop's guard: log with the traceback, back off, go on
                log.exception("webhook consume loop error")
                await backoff.sleep(stop)

    async def _reclaim_loop(self, stop: asyncio.Event, tg: asyncio.TaskGroup) -> None:
        interval = self._config.reclaim_interval_ms / 1000
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
            if stop.is_set() or self._free() <= 0:
                continue
            try:
                async with self._intake:
                    async with asyncio.timeout(10):
                        entries = await self._reclaimer.reclaim(self._free())
                    self._admit(entries, tg, stop)
            except TRANSIENT_ERRORS as exc:
                log.debug("reclaim skipped", extra={"error": describe(exc)})
            except Exception:
                # the loop's guard: an answer that is not passing trouble never ends the sender
                log.exception("webhook reclaim loop error")

    async def _promote_loop(self, stop: asyncio.Event) -> None:
        interval = self._config.promote_interval_ms / 1000
        backoff = Backoff(base=0.1, cap=interval)
        while not stop.is_set():
            self._retry_parked.clear()
            try:
                async with asyncio.timeout(10):
                    moved, wait_ms = await self._store.promote(_PROMOTE_BATCH)
                backoff.reset()
                if moved >= _PROMOTE_BATCH:
                    continue
                delay = interval if wait_ms < 0 else min(interval, wait_ms / 1000)
            except TRANSIENT_ERRORS as exc:
                log.debug("promotion skipped", extra={"error": describe(exc)})
                delay = backoff.next_delay()
            except Exception:
                # the loop's guard: an answer that is not passing trouble never ends the sender
                log.exception("webhook promote loop error")
                delay = backoff.next_delay()
            await _first_of(stop, self._retry_parked, timeout=delay)

    def _admit(self, entries: Sequence[Entry], tg: asyncio.TaskGroup, stop: asyncio.Event) -> None:
        if stop.is_set():
            # read as we were stopping: left pending, claimable once our lease is released
            return
        for entry in entries:
            task = tg.create_task(self._deliver(entry))
            self._inflight.add(task)
            task.add_done_callback(self._release)

    def _release(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slot_freed.set()

    async def _deliver(self, entry: Entry) -> None:
        bind(stream=entry.stream, entry_id=entry.entry_id)
        try:
            await self._deliver_entry(entry)
        except Exception:
            # the delivery's guard: an answer from Redis that is not passing trouble leaves the
            # entry pending (another sender reclaims it once this one's lease is gone); it never
            # ends the sender
            log.exception("delivery left pending after an error")

    async def _deliver_entry(self, entry: Entry) -> None:
        history = parse_attempt_log(entry.fields.get(F_ATTEMPT_LOG))
        try:
            job = WebhookJob.model_validate_json(entry.data or b"")
        except ValidationError:
            log.warning("unreadable webhook job, dead-lettered")
            dead = dead_settlement(entry, None, history, "invalid_job", E_INVALID_JOB, now_ms())
            await self._settle(entry, dead)
            return
        bind(task_id=job.task_id, delivery_id=job.delivery_id, host=urlsplit(job.url).hostname)
        cfg = self._config
        if cfg.schedule_s[0] > 0 and F_ATTEMPT_LOG not in entry.fields:
            # a fresh job and a schedule that starts with a delay: wait in the delayed set
            await self._settle(entry, deferral(entry, job, cfg.schedule_s[0]))
            self._retry_parked.set()
            return
        body = build_body(job, thin=cfg.thin, max_bytes=cfg.max_body_bytes)
        if body is None:
            log.warning("webhook payload over the size limit even in thin form, dead-lettered")
            dead = dead_settlement(
                entry, job, history, "payload_too_large", E_PAYLOAD_TOO_LARGE, now_ms()
            )
            await self._settle(entry, dead)
            return
        # the delivery continues the trace of the task's outcome (the worker's span)
        with self._tracer.start_as_current_span(
            "webhook deliver", context=context_from(entry.traceparent, entry.tracestate),
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": "POST", "server.address": urlsplit(job.url).hostname or "",
                "sop.task_id": job.task_id, "sop.delivery_id": job.delivery_id,
                "sop.attempt": len(history) + 1,
            },
        ) as span:  # fmt: skip
            result = await self._attempt(job, body)
            if result.status is not None:
                span.set_attribute("http.response.status_code", result.status)
            if result.error is not None:
                span.set_attribute("error.type", result.error)
                span.set_status(Status(StatusCode.ERROR))
        history = [*history, AttemptRecord(at=now_ms(), status=result.status, error=result.error)]
        decision = decide(
            result, len(history), cfg.schedule_s,
            jitter=cfg.jitter, retry_after_cap_s=cfg.retry_after_cap_s,
        )  # fmt: skip
        settlement = settlement_after(entry, job, history, result, decision, now_ms())
        await self._settle(entry, settlement)
        if self._metrics is not None:
            self._metrics.webhooks.labels(decision.outcome).inc()
        log.info(
            "webhook attempt settled",
            extra={"outcome": decision.outcome, "attempt": len(history), "status": result.status,
                   "error": result.error, "retry_in_s": round(decision.delay_s, 3)},
        )  # fmt: skip
        if decision.outcome == "retry":
            self._retry_parked.set()

    async def _attempt(self, job: WebhookJob, body: bytes) -> AttemptResult:
        """One POST; no response body is read or kept, only the status code."""
        assert self._session is not None
        try:
            # literal addresses never reach the resolver: vet them here, before any connection
            check_webhook_url(job.url, self._allow)
            headers = {"Content-Type": "application/json"}
            headers.update(self._signer.headers(job.delivery_id, body))
            traceparent, tracestate = current_traceparent()
            if traceparent:
                headers["traceparent"] = traceparent
                if tracestate:
                    headers["tracestate"] = tracestate
            async with asyncio.timeout(self._config.timeout_s):
                # redirects are failures and never followed (a 3xx could point anywhere)
                post = self._session.post(
                    job.url, data=body, headers=headers, allow_redirects=False
                )
                async with post as resp:
                    return from_response(resp.status, resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            return from_exception(exc)
        except Exception as exc:
            log.exception("unexpected error in a webhook attempt")
            return from_exception(exc)

    async def _settle(self, entry: Entry, settlement: Settlement) -> None:
        # shielded: a shutdown does not cut it in half; Redis trouble is retried until it lands
        # (the entry stays pending meanwhile, so nothing is lost)
        backoff = Backoff(base=0.05, cap=2.0)
        while True:
            try:
                settled = await asyncio.shield(self._settle_once(entry, settlement))
            except TRANSIENT_ERRORS as exc:
                if backoff.failures == 0:
                    log.warning("webhook settle failed, retrying", extra={"error": describe(exc)})
                await backoff.sleep()
                continue
            if not settled:
                log.warning("delivery was reclaimed by another sender; its attempt settles it")
            return

    async def _settle_once(self, entry: Entry, settlement: Settlement) -> bool:
        async with asyncio.timeout(15):
            return await self._store.settle(entry, self.consumer, settlement)


async def _first_of(*events: asyncio.Event, timeout: float | None = None) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
