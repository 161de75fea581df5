"""Calling the sidecar over real HTTP and checking each answer against its OpenAPI document."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from pydantic import SecretStr
from redis.asyncio import Redis

from sop_llm.ops.openapi import openapi_document
from sop_llm.ops.settings import Settings
from sop_llm.ops.sidecar import Sidecar
from tests.ops.docschema import resolve, validate

DOC: dict[str, Any] = openapi_document()


def settings_for(redis_url: str, namespace: str, **kw: Any) -> Settings:
    return Settings(redis_url=SecretStr(redis_url), namespace=namespace, sidecar_port=0, **kw)


def documented_schema(template: str, method: str, status: int) -> str | None:
    """The pointer of the JSON schema documented for ``method template`` answering ``status``
    (``None``: documented without a JSON body). Fails when the status is not documented."""
    op = DOC["paths"][template][method.lower()]
    assert str(status) in op["responses"], f"{method} {template}: {status} is not documented"
    pointer = f"#/paths/{template.replace('/', '~1')}/{method.lower()}/responses/{status}"
    response = resolve(DOC, pointer)
    if "$ref" in response:
        pointer, response = response["$ref"], resolve(DOC, response["$ref"])
    if "application/json" not in response.get("content", {}):
        return None
    return f"{pointer}/content/application~1json/schema"


class Api:
    """One sidecar, reached over HTTP; every JSON answer is validated against the document."""

    def __init__(self, http: aiohttp.ClientSession, base: str, token: str | None = None) -> None:
        self.http, self.base, self.token = http, base, token

    async def call(
        self,
        method: str,
        path: str,
        template: str,
        status: int,
        *,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        sent = dict(headers or {})
        if self.token is not None:
            sent.setdefault("Authorization", f"Bearer {self.token}")
        kw: dict[str, Any] = {"headers": sent}
        if body is not None:
            kw["json"] = body
        elif raw is not None:
            kw["data"] = raw
        async with self.http.request(method, self.base + path, **kw) as r:
            text = await r.text()
            assert r.status == status, (method, path, r.status, text)
            assert r.content_type == "application/json", (method, path, r.content_type)
            found = await r.json()
            self.last_headers = r.headers
        schema = documented_schema(template, method, status)
        assert schema is not None, f"{method} {template} {status}: no JSON body documented"
        validate(DOC, schema, found)
        return found


@contextlib.asynccontextmanager
async def serving(
    client: Redis, redis_url: str, namespace: str, token: str | None = None, **kw: Any
) -> AsyncIterator[Api]:
    """A sidecar on a free port for the test's namespace, and an :class:`Api` on it."""
    extra = {"sidecar_token": SecretStr(token)} if token is not None else {}
    side = Sidecar(client=client, settings=settings_for(redis_url, namespace, **extra, **kw))
    async with side.running(), aiohttp.ClientSession() as http:
        yield Api(http, f"http://127.0.0.1:{side.port}", token)
