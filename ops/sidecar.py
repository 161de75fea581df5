"""The aiohttp sidecar: task status, queue figures and health, the operator console
(:mod:`ops.console`) and the HTTP API it uses (:mod:`ops.http_api`).

Every answer but the console's files is JSON, errors included (``{"error": <code>, "message":
...}``), and no request can make it answer 500: a missing, repeated or malformed
``Authorization`` header (whatever its bytes) is a 401, any id that names no task (whatever its
characters) a 404, a path it does not serve a 404, bad input a 4xx, Redis trouble a 503. A
client that goes away mid-stream is an ordinary end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from sop_llm.handlers.metrics import Metrics
from sop_llm.ops import console
from sop_llm.ops.asyncapi import asyncapi_document
from sop_llm.ops.gpu_setup import GpuRuntime
from sop_llm.ops.http_api import HttpApi
from sop_llm.ops.http_common import REDIS_FAILURES, Handler, HttpError, guard_unsafe, json_error
from sop_llm.ops.openapi import openapi_document
from sop_llm.ops.settings import Settings
from sop_llm.schemas.result import StatusRecord
from sop_llm.schemas.task import TASK_ID_PATTERN
from sop_llm.streams.errors import describe
from sop_llm.streams.keys import Keys
from sop_llm.streams.queue_stats import PartitionStats, read_partition_stats
from sop_llm.streams.status import read_status
from sop_llm.streams.tokens import read_tokens

if TYPE_CHECKING:
    from sop_llm.handlers.tasks import Worker

log = logging.getLogger(__name__)

_OPEN_ROUTES: Final = frozenset({"/health/live", *console.OPEN_ROUTES})
_TASK_ID_RE = re.compile(TASK_ID_PATTERN)
# a probe or a scrape is answered whatever Redis says: a refusal (NOPERM) means "not ready" as
# much as an outage does, and neither may turn into a 500
READY_TIMEOUT_S: Final = 0.25
"""``/health/ready`` answers within this (probes commonly give up after 1 s)."""


def _unauthorized() -> web.Response:
    return json_error(
        401,
        "unauthorized",
        "a valid bearer token is required",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _no_such_task() -> web.Response:
    # the id is not echoed: it may be anything, of any length
    return json_error(404, "not_found", "no task with this id (never seen, or expired)")


def _bearer_token(request: web.Request) -> bytes | None:
    """The token of the request's one ``Authorization: Bearer <token>`` header, as the bytes
    that came over the wire (they need not be UTF-8); ``None`` when the header is missing,
    repeated or of another form."""
    values = [v for name, v in request.raw_headers if name.lower() == b"authorization"]
    if len(values) != 1:
        return None
    scheme, space, token = values[0].partition(b" ")
    token = token.lstrip(b" ")
    if not space or scheme.lower() != b"bearer" or not token:
        return None
    return token


class Sidecar:
    def __init__(
        self,
        *,
        client: Redis,
        settings: Settings,
        worker: Worker | None = None,
        metrics: Metrics | None = None,
        gpu: GpuRuntime | None = None,
        with_worker: bool | None = None,
    ) -> None:
        """``with_worker``: this process runs a worker (default: one is given); when it is to
        come later (:meth:`attach`, once Redis answered at start-up), readiness says "worker
        not started" meanwhile."""
        self._metrics = metrics or Metrics()
        self._with_worker = worker is not None if with_worker is None else with_worker
        self._gpu = gpu
        self._client = client
        self._settings = settings
        self._keys = Keys(settings.namespace)
        self._worker = worker
        # digests are compared, so the comparison takes as long whatever the token's length
        self._token_digest = (
            hashlib.sha256(settings.sidecar_token.get_secret_value().encode()).digest()
            if settings.sidecar_token
            else None
        )
        self.port: int | None = None

    def attach(self, *, worker: Worker | None = None, gpu: GpuRuntime | None = None) -> None:
        """The parts built once Redis answered: the sidecar answers probes before them."""
        if worker is not None:
            self._worker = worker
        if gpu is not None:
            self._gpu = gpu

    def app(self) -> web.Application:
        # a submitted task's body holds its prompt (up to SOP_MAX_PROMPT_BYTES), JSON-escaped
        limit = max(64 << 10, 4 * self._settings.max_prompt_bytes + (64 << 10))
        guard = guard_unsafe(token_set=self._token_digest is not None)
        app = web.Application(middlewares=[self._errors, self._auth, guard], client_max_size=limit)
        app.router.add_get("/v1/tasks/{task_id}", self.task)
        app.router.add_get("/v1/tasks/{task_id}/stream", self.token_stream)
        app.router.add_get("/v1/queue", self.queue)
        app.router.add_get("/v1/gpu", self.gpu)
        app.router.add_get("/health/live", self.live)
        app.router.add_get("/health/ready", self.ready)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/asyncapi.json", self.asyncapi)
        app.router.add_get("/openapi.json", self.openapi)
        HttpApi(client=self._client, settings=self._settings).add_routes(app)
        console.add_routes(app)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A handler's :class:`HttpError`, Redis trouble (503) and aiohttp's own error answers
        (no such path, method not allowed, body too large...) in our JSON."""
        try:
            return await handler(request)
        except HttpError as exc:
            return exc.response()
        except REDIS_FAILURES as exc:
            return json_error(503, "unavailable", f"redis unavailable: {describe(exc)}")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = exc.reason.lower().replace(" ", "_")
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return json_error(exc.status, code, exc.reason, headers=allow)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else None
        if self._token_digest is not None and route not in _OPEN_ROUTES:
            token = _bearer_token(request)
            given = hashlib.sha256(token or b"").digest()
            if not hmac.compare_digest(given, self._token_digest) or token is None:
                return _unauthorized()
        return await handler(request)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Sidecar]:
        # a handler is cancelled when its client goes away: a token stream of a task still
        # queued would otherwise poll Redis for a reader that is gone, holding a connection
        runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, self._settings.sidecar_host, self._settings.sidecar_port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._settings.sidecar_port
        try:
            yield self
        finally:
            await runner.cleanup()

    async def _status(self, task_id: str) -> StatusRecord | web.Response:
        """The status record of ``task_id``, or the answer to give instead: 404 for an id that
        names no task, whatever its characters (one that cannot be a task id is not looked up;
        a key of another type under its name is no task either), 503 when Redis fails."""
        if not _TASK_ID_RE.fullmatch(task_id):
            return _no_such_task()
        try:
            record = await read_status(self._client, self._keys, task_id)
        except ResponseError as exc:
            if str(exc).startswith("WRONGTYPE"):
                return _no_such_task()
            return json_error(503, "unavailable", f"redis refused: {type(exc).__name__}")
        except REDIS_FAILURES as exc:
            return json_error(503, "unavailable", f"redis unreachable: {type(exc).__name__}")
        return _no_such_task() if record is None else record

    async def task(self, request: web.Request) -> web.Response:
        found = await self._status(request.match_info["task_id"])
        if isinstance(found, web.Response):
            return found
        return web.json_response(text=found.model_dump_json(exclude_none=True))

    async def token_stream(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: ``delta`` events (``{"text": ...}``) from the first token, then
        one ``end`` event (``{"state": ..., "finish_reason": ...}``)."""
        task_id = request.match_info["task_id"]
        found = await self._status(task_id)
        if isinstance(found, web.Response):
            return found
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        try:
            await response.prepare(request)
            async for event in read_tokens(self._client, self._keys, task_id):
                if event.kind == "delta":
                    payload = json.dumps({"text": event.text})
                else:
                    body = {"state": event.state, "finish_reason": event.finish_reason}
                    payload = json.dumps(body)
                await response.write(f"event: {event.kind}\ndata: {payload}\n\n".encode())
            await response.write_eof()
        except ConnectionResetError:
            # the reader went away: an ordinary end of a stream, not a server error
            log.debug("token stream reader disconnected", extra={"task_id": task_id})
        except REDIS_FAILURES as exc:
            if not response.prepared:
                raise  # answered 503 by the error middleware
            # the status line is sent: the stream ends early, and the reader sees no end event
            log.warning("token stream cut: redis failed", extra={"error": describe(exc)})
        return response

    async def queue(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"partitions": await queue_figures(self._client, self._keys, self._settings)}
        )

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text: this process's worker metrics and the queue figures read now."""
        m = self._metrics
        try:
            for row in await _partition_stats(self._client, self._keys, self._settings):
                labels = (row.pool, row.partition)
                m.queue_depth.labels(*labels).set(row.length)
                m.queue_lag.labels(*labels).set(row.lag if row.lag is not None else float("nan"))
                m.queue_pending.labels(*labels).set(row.pending)
                age = row.oldest_pending_age_ms
                m.queue_oldest.labels(*labels).set(age / 1000 if age is not None else 0)
        except REDIS_FAILURES:
            pass  # Redis away: serve the process metrics anyway; /health/ready tells the rest
        if self._gpu is not None:
            self._gpu.export(m)
        return web.Response(
            body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def gpu(self, request: web.Request) -> web.Response:
        """Devices, memory, loaded models, semaphore holders and waiters."""
        if self._gpu is None:
            return web.json_response({"status": "no GPU runtime in this process", "devices": []})
        return web.json_response(await self._gpu.snapshot())

    async def asyncapi(self, request: web.Request) -> web.Response:
        """The AsyncAPI 3.0 document of this namespace's streams."""
        return web.json_response(asyncapi_document(self._settings.namespace))

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI 3.1 document of this sidecar."""
        return web.json_response(
            openapi_document(pools=self._settings.pools, partitions=self._settings.partitions)
        )

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def ready(self, request: web.Request) -> web.Response:
        """200 or 503 with the reasons, within about 250 ms whatever Redis does (a probe that
        times out says nothing): ``redis unreachable: <cause>``, ``redis did not answer within
        250 ms``, ``worker not started``, ``worker cannot reach redis``, ``worker stalled: <the
        call that waits>``, a missing group."""
        problems = []
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await self._client.ping()
                stats = await _partition_stats(self._client, self._keys, self._settings)
            problems += [f"consumer group missing on {s.stream}" for s in stats if not s.group]
        except TimeoutError:
            problems.append(f"redis did not answer within {int(READY_TIMEOUT_S * 1000)} ms")
        except REDIS_FAILURES as exc:
            problems.append(f"redis unreachable: {describe(exc)}")
        worker = self._worker
        if worker is None:
            if self._with_worker:
                problems.append("worker not started")
        elif not worker.started:
            problems.append("worker not started")
        else:
            if not worker.ready:
                problems.append("worker cannot reach redis")
            if (stall := worker.stalled()) is not None:
                problems.append(f"worker stalled: {stall}")
        if problems:
            return web.json_response({"status": "not_ready", "problems": problems}, status=503)
        return web.json_response({"status": "ready"})


async def queue_figures(client: Redis, keys: Keys, settings: Settings) -> list[dict[str, Any]]:
    """The ``GET /v1/queue`` rows of the configured pools and partitions (see
    :func:`streams.queue_stats.read_partition_stats`)."""
    stats = await _partition_stats(client, keys, settings)
    return [s.as_json() for s in stats]


async def _partition_stats(client: Redis, keys: Keys, settings: Settings) -> list[PartitionStats]:
    return await read_partition_stats(
        client, keys, pools=settings.pools, partitions=settings.partitions
    )
