"""The sidecar's HTTP API for the console and for clients without Redis: submit and cancel
tasks, requeue and purge dead letters, redeliver webhooks, register and remove models; and the
views the console reads (:mod:`ops.console_data`).

Each action is the SDK's or the CLI's own function (``Producer.submit``, ``streams.dead``,
``WebhookAdmin``, ``ModelStore``), so the HTTP path and the command line cannot drift apart.
Bad input is a JSON 4xx (``ops/openapi/console_paths.py`` documents each), Redis trouble a 503.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Final, TypeVar
from urllib.parse import quote

from aiohttp import web
from pydantic import BaseModel, Field, SecretStr, StrictBool, StringConstraints, ValidationError
from redis.asyncio import Redis

from sop_llm.handlers.webhooks import WebhookAdmin, WebhookBusyError, WebhookNotFoundError
from sop_llm.ops import console_data as data
from sop_llm.ops.http_common import (
    HttpError,
    json_object,
    query_bool,
    query_choice,
    query_int,
    query_text,
)
from sop_llm.ops.settings import Settings
from sop_llm.schemas.errors import (
    BacklogFullError,
    DuplicateTaskIdError,
    ErrorCode,
    IdempotencyConflictError,
    InvalidTaskError,
    NotReplicatedError,
)
from sop_llm.schemas.models import ModelSpec, describe_spec_error
from sop_llm.schemas.result import TaskState
from sop_llm.schemas.task import (
    CTX_MAX_METADATA_BYTES,
    CTX_MAX_PROMPT_BYTES,
    MODEL_PATTERN,
    TASK_ID_PATTERN,
    TaskEvent,
    describe_validation_error,
)
from sop_llm.schemas.wire import StrictModel
from sop_llm.streams.control import CancelOutcome
from sop_llm.streams.dead import DeadEntry, NotRequeueable, matcher, purge, requeue
from sop_llm.streams.keys import Keys
from sop_llm.streams.models import ModelStore, worker_models
from sop_llm.streams.producer import Producer
from sop_llm.streams.status import read_status

_TASK_ID_RE: Final = re.compile(TASK_ID_PATTERN)
_MODEL_RE: Final = re.compile(MODEL_PATTERN)
_CANCEL_STATUS: Final = {
    CancelOutcome.CANCELLED: 200,
    CancelOutcome.REQUESTED: 202,
    CancelOutcome.FINISHED: 409,
}


EntryId = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,20}-[0-9]{1,20}$")]
Filter = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class DeadSelection(StrictModel):
    """The body of ``POST /v1/dead/requeue`` and ``/v1/dead/purge``: entry ids, filters (all
    must hold) or ``all``."""

    ids: Annotated[list[EntryId], Field(min_length=1, max_length=1000)] | None = None
    task_id: Filter | None = None
    reason: ErrorCode | None = None
    model: Filter | None = None
    all: StrictBool = False


M = TypeVar("M", bound=BaseModel)


def _validated(model: type[M], body: dict[str, Any], code: str) -> M:
    """``body`` as ``model`` (422 ``code`` naming each bad field). A field given as ``null``
    is refused too: the document has no nullable field in these bodies."""
    nulls = sorted(name for name, value in body.items() if value is None)
    if nulls:
        raise HttpError(422, code, f"{', '.join(nulls)}: null is not a value here")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise HttpError(422, code, describe_validation_error(exc)) from None


def _not_found(what: str) -> HttpError:
    return HttpError(404, "not_found", what)


def _task_id(request: web.Request) -> str:
    task_id = request.match_info["task_id"]
    if not _TASK_ID_RE.fullmatch(task_id):
        raise _not_found("no task with this id (never seen, or expired)")
    return task_id


def _model_name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not _MODEL_RE.fullmatch(name):
        raise _not_found("no model of this name")
    return name


def _producer_config_settings(settings: Settings) -> Settings:
    # Settings.producer_config() wants SOP_REDIS_URL, which a Sentinel deployment has not; the
    # producer here talks through the sidecar's own client and never uses the URL
    if settings.redis_url is not None:
        return settings
    return settings.model_copy(update={"redis_url": SecretStr("redis://unused")})


class HttpApi:
    """The handlers; :meth:`add_routes` puts them on the sidecar's application."""

    def __init__(self, *, client: Redis, settings: Settings) -> None:
        self._client = client
        self._settings = settings
        self._keys = Keys(settings.namespace)
        self._producer = Producer(_producer_config_settings(settings), client=client)
        self._models = ModelStore(client=client, keys=self._keys)
        self._webhooks = WebhookAdmin(client=client, keys=self._keys)

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/v1/tasks", self.submit)
        r.add_delete("/v1/tasks/{task_id}", self.cancel)
        r.add_get("/v1/tasks/{task_id}/history", self.history)
        r.add_get("/v1/overview", self.overview)
        r.add_get("/v1/inflight", self.inflight)
        r.add_get("/v1/results", self.results)
        r.add_get("/v1/dead", self.dead)
        r.add_post("/v1/dead/requeue", self.requeue)
        r.add_post("/v1/dead/purge", self.purge)
        r.add_get("/v1/webhooks/dead", self.webhook_dead)
        r.add_post("/v1/webhooks/{task_id}/redeliver", self.redeliver)
        r.add_get("/v1/models", self.models)
        r.add_post("/v1/models", self.register_model)
        # a model name may hold '/' (org/model): the path parameter takes the rest of the path
        r.add_get("/v1/models/{name:.+}", self.model)
        r.add_delete("/v1/models/{name:.+}", self.remove_model)

    # tasks

    async def submit(self, request: web.Request) -> web.Response:
        """``POST /v1/tasks``: the body is a task event; 202 with its id and a Location."""
        body = await json_object(request)
        key = request.headers.getall("Idempotency-Key", [])
        if len(key) > 1:
            raise HttpError(422, "invalid_event", "one Idempotency-Key header at most")
        if key:
            if body.get("idempotency_key", key[0]) not in (key[0], None):
                message = "the Idempotency-Key header and the body's idempotency_key differ"
                raise HttpError(409, "idempotency_conflict", message)
            body["idempotency_key"] = key[0]
        settings = self._settings
        try:
            event = TaskEvent.model_validate(
                body,
                context={CTX_MAX_PROMPT_BYTES: settings.max_prompt_bytes,
                         CTX_MAX_METADATA_BYTES: settings.max_metadata_bytes},
            )  # fmt: skip
        except ValidationError as exc:
            raise HttpError(422, "invalid_event", describe_validation_error(exc)) from None
        if event.pool is not None and event.pool not in settings.pools:
            pools = ", ".join(settings.pools)
            raise HttpError(
                422, "invalid_event", f"pool: {event.pool!r} is not served here (have {pools})"
            )
        try:
            task_id = await self._producer.submit(event)
        except InvalidTaskError as exc:  # an unknown partition, a refused webhook URL
            raise HttpError(422, "invalid_event", str(exc)) from None
        except (IdempotencyConflictError, DuplicateTaskIdError) as exc:
            raise HttpError(409, exc.code.value, str(exc)) from None
        except BacklogFullError as exc:
            raise HttpError(429, exc.code.value, str(exc), headers={"Retry-After": "1"}) from None
        except NotReplicatedError as exc:
            raise HttpError(503, "not_replicated", str(exc)) from None
        location = f"/v1/tasks/{task_id}"
        return web.json_response(
            {"task_id": task_id, "location": location}, status=202, headers={"Location": location}
        )

    async def cancel(self, request: web.Request) -> web.Response:
        """``DELETE /v1/tasks/{task_id}``: 200 cancelled, 202 asked to stop, 409 finished."""
        task_id = _task_id(request)
        outcome = await self._producer.cancel(task_id)
        if outcome is CancelOutcome.UNKNOWN:
            raise _not_found("no task with this id (never seen, or expired)")
        body = {"task_id": task_id, "outcome": outcome.value}
        return web.json_response(body, status=_CANCEL_STATUS[outcome])

    async def history(self, request: web.Request) -> web.Response:
        task_id = _task_id(request)
        if await read_status(self._client, self._keys, task_id) is None:
            raise _not_found("no task with this id (never seen, or expired)")
        return web.json_response(await data.task_history(self._client, self._keys, task_id))

    # views

    async def overview(self, request: web.Request) -> web.Response:
        return web.json_response(await data.overview(self._client, self._keys, self._settings))

    async def inflight(self, request: web.Request) -> web.Response:
        limit = query_int(request, "limit", default=100, low=1, high=1000)
        return web.json_response(
            await data.inflight(self._client, self._keys, self._settings, limit=limit)
        )

    async def results(self, request: web.Request) -> web.Response:
        count = query_int(request, "count", default=50, low=1, high=500)
        state = query_choice(request, "state", [s.value for s in TaskState if s.terminal])
        found = await data.recent_results(
            self._client, self._keys, count=count, state=state,
            model=query_text(request, "model"), task_id=query_text(request, "task_id"),
        )  # fmt: skip
        return web.json_response(found)

    # dead letters

    def _dead_filters(self, request: web.Request) -> dict[str, Any]:
        return {
            "task_id": query_text(request, "task_id"),
            "reason": query_choice(request, "reason", [c.value for c in ErrorCode]),
            "model": query_text(request, "model"),
        }

    async def dead(self, request: web.Request) -> web.Response:
        count = query_int(request, "count", default=100, low=1, high=1000)
        return web.json_response(
            await data.dead_letters(
                self._client, self._keys, count=count, **self._dead_filters(request)
            )
        )

    async def _chosen(self, request: web.Request) -> tuple[list[DeadEntry], list[str]]:
        """The dead letters a requeue or purge body names (``ids``, filters or ``all``) and the
        ids it named that are not there. Raises :class:`HttpError` for a body naming nothing."""
        sel = _validated(DeadSelection, await json_object(request), "invalid_body")
        filters = {"task_id": sel.task_id, "reason": sel.reason, "model": sel.model}
        if sel.ids is None and not any(filters.values()) and not sel.all:
            raise HttpError(
                422, "selection_required", "name entry ids or a filter, or send all: true"
            )
        match = matcher(**filters)
        # every dead letter, as sop-llm dead requeue|purge reads them (the views read the newest)
        letters, _ = await data.read_dead(self._client, self._keys, scan=None)
        chosen = [d for d in letters if match(d)]
        missing: list[str] = []
        if sel.ids is not None:
            wanted = set(sel.ids)
            chosen = [d for d in chosen if d.entry_id in wanted]
            missing = sorted(wanted - {d.entry_id for d in chosen})
            if not chosen:
                raise _not_found("none of these dead letters is there (requeued or purged?)")
        return chosen, missing

    async def requeue(self, request: web.Request) -> web.Response:
        """``POST /v1/dead/requeue``: each chosen dead task published again (same task id)."""
        chosen, missing = await self._chosen(request)
        done, failed = [], []
        for d in chosen:
            try:
                new_id = await requeue(self._client, self._keys, d)
            except (NotRequeueable, ValueError) as exc:
                failed.append({"id": d.entry_id, "message": str(exc)})
                continue
            done.append({"id": d.entry_id, "task_id": d.letter.task_id,
                         "stream": d.letter.source_stream, "entry_id": new_id})  # fmt: skip
        return web.json_response({"requeued": done, "failed": failed, "missing": missing})

    async def purge(self, request: web.Request) -> web.Response:
        chosen, missing = await self._chosen(request)
        count = await purge(self._client, self._keys, [d.entry_id for d in chosen])
        return web.json_response({"purged": count, "missing": missing})

    # webhooks

    async def webhook_dead(self, request: web.Request) -> web.Response:
        count = query_int(request, "count", default=50, low=1, high=1000)
        return web.json_response(
            await data.webhook_dead_letters(self._client, self._keys, count=count)
        )

    async def redeliver(self, request: web.Request) -> web.Response:
        """``POST /v1/webhooks/{task_id}/redeliver[?force=true]``: the delivery sent again."""
        task_id = _task_id(request)
        force = query_bool(request, "force")
        try:
            done = await self._webhooks.redeliver(task_id, force=force)
        except WebhookNotFoundError as exc:
            raise _not_found(str(exc)) from None
        except WebhookBusyError as exc:
            raise HttpError(409, "busy", str(exc)) from None
        body = {"task_id": task_id, "delivery_id": done.delivery_id,
                "entry_id": done.entry_id, "from_dead": done.from_dead}  # fmt: skip
        return web.json_response(body, status=202)

    # models

    async def models(self, request: web.Request) -> web.Response:
        """The runtime registry, the built-in models and the live workers serving each."""
        # imported here: ops.cli.inspect imports ops.sidecar, which serves this module
        from sop_llm.ops.cli.inspect import BUILTIN_MODELS

        snap = await self._models.snapshot()
        served: dict[str, list[str]] = {}
        for w in await worker_models(self._client, self._keys):
            for model in w.models:
                served.setdefault(model, []).append(w.consumer)
        return web.json_response(
            {
                "version": snap.version,
                "specs": [s.model_dump(mode="json") for s in snap.specs],
                "invalid": snap.invalid,
                "builtin": list(BUILTIN_MODELS),
                "served": {m: served[m] for m in sorted(served)},
            }
        )

    async def register_model(self, request: web.Request) -> web.Response:
        """``POST /v1/models``: register or replace a spec; 201 registered, 200 replaced."""
        body = await json_object(request)
        try:
            # strict, from JSON: a number is no string and a boolean no number, as the
            # document says (the JSON text again, so that arrays stay valid for tuples)
            spec = ModelSpec.model_validate_json(json.dumps(body), strict=True)
        except ValidationError as exc:
            raise HttpError(422, "invalid_spec", describe_spec_error(exc)) from None
        existed = bool(await self._models.registered({spec.name}))
        version = await self._models.put(spec)
        return web.json_response(
            {"name": spec.name, "version": version},
            status=200 if existed else 201,
            # one path segment, whatever the name holds ('/' included)
            headers={"Location": f"/v1/models/{quote(spec.name, safe='')}"},
        )

    async def model(self, request: web.Request) -> web.Response:
        name = _model_name(request)
        try:
            spec = await self._models.get(name)
        except ValidationError as exc:
            message = f"the stored spec is invalid: {describe_spec_error(exc)}"
            raise HttpError(409, "invalid_spec", message) from None
        if spec is None:
            raise _not_found("no model of this name is registered at run time")
        return web.json_response(spec.model_dump(mode="json"))

    async def remove_model(self, request: web.Request) -> web.Response:
        name = _model_name(request)
        if not await self._models.remove(name):
            raise _not_found("no model of this name is registered at run time")
        return web.json_response({"name": name, "version": await self._models.version()})
