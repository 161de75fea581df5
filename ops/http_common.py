"""What every sidecar endpoint shares: JSON errors, request bodies and query parameters, the
guard on state-changing requests.

A handler raises :class:`HttpError` for any answer that is not its success; the sidecar's
error middleware turns it (and Redis trouble, and aiohttp's own errors) into the JSON error
body ``{"error": <code>, "message": <text>}``, so no request can make it answer 500.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware
from redis.exceptions import RedisError

from sop_llm.schemas.errors import BrokerError
from sop_llm.streams.errors import TRANSIENT_ERRORS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REDIS_FAILURES: Final[tuple[type[BaseException], ...]] = (
    *TRANSIENT_ERRORS,
    RedisError,
    BrokerError,
)
"""Redis unreachable or refusing (the SDK's errors included): the answer is a 503."""
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_LOCAL_NAMES: Final = frozenset({"localhost"})


def json_error(
    status: int, code: str, message: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


class HttpError(Exception):
    """An answer other than success: raised by a handler, answered as a JSON error."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def response(self) -> web.Response:
        return json_error(self.status, self.code, self.message, headers=self.headers)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _number(literal: str) -> float | int:
    """A JSON number with a fraction or an exponent: an integer when it is one (``2.0``, ``1e3``).
    JSON Schema, and so the document, has ``2.0`` an integer; the wire models take only
    integers where they want one, so the body is read as JSON Schema reads it."""
    value = float(literal)
    if value.is_integer() and abs(value) <= 2**63:
        return int(value)
    return value


async def json_body(request: web.Request) -> Any:
    """The request's body, parsed. Raises :class:`HttpError`: 415 for a body that is not
    declared ``application/json``, 400 for one that is not JSON (``NaN`` and ``Infinity``
    included); a body past the sidecar's size limit is aiohttp's 413."""
    if request.content_type != "application/json":
        raise HttpError(415, "unsupported_media_type", "send the body as application/json")
    raw = await request.read()
    try:
        return json.loads(raw, parse_constant=_no_constant, parse_float=_number)
    except (ValueError, RecursionError) as exc:
        raise HttpError(400, "invalid_json", f"the body is not JSON: {exc}") from None


async def json_object(request: web.Request) -> dict[str, Any]:
    """:func:`json_body`, which must be a JSON object (422 otherwise)."""
    body = await json_body(request)
    if not isinstance(body, dict):
        raise HttpError(422, "invalid_body", "the body must be a JSON object")
    return body


def _bad_parameter(name: str, why: str) -> HttpError:
    return HttpError(400, "invalid_parameter", f"query parameter {name}: {why}")


def query_one(request: web.Request, name: str) -> str | None:
    """The query parameter ``name`` (400 when it is given more than once)."""
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise _bad_parameter(name, "given more than once")
    return values[0] if values else None


def query_int(request: web.Request, name: str, *, default: int, low: int, high: int) -> int:
    raw = query_one(request, name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or not low <= int(raw) <= high:
        raise _bad_parameter(name, f"an integer from {low} to {high}")
    return int(raw)


def query_choice(request: web.Request, name: str, choices: Sequence[str]) -> str | None:
    raw = query_one(request, name)
    if raw is not None and raw not in choices:
        raise _bad_parameter(name, "one of " + ", ".join(choices))
    return raw


def query_text(request: web.Request, name: str, *, max_length: int = 256) -> str | None:
    raw = query_one(request, name)
    if raw is not None and len(raw) > max_length:
        raise _bad_parameter(name, f"at most {max_length} characters")
    return raw


def query_bool(request: web.Request, name: str) -> bool:
    return query_choice(request, name, ("true", "false")) == "true"


def _hostname(netloc: str) -> str:
    return urlsplit("//" + netloc).hostname or ""


def _is_address_or_localhost(host: str) -> bool:
    if host in _LOCAL_NAMES:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def guard_unsafe(*, token_set: bool) -> Middleware:
    """A middleware for the requests that change something (any method but GET, HEAD and
    OPTIONS), which no web page of another origin may send for a browser:

    * one whose ``Origin`` is not this host (a cross-site form post) is a 403;
    * without a token, one addressed by a host *name* other than ``localhost`` is a 403: a
      name can be re-pointed at 127.0.0.1 by its owner (DNS rebinding), an address cannot.
    """

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in SAFE_METHODS:
            origin = request.headers.get("Origin")
            if origin is not None and urlsplit(origin).netloc.lower() != request.host.lower():
                raise HttpError(403, "forbidden", "a request from another origin is refused")
            if not token_set and not _is_address_or_localhost(_hostname(request.host)):
                raise HttpError(
                    403,
                    "forbidden",
                    "without SOP_SIDECAR_TOKEN, changes are accepted only through an IP address "
                    "or localhost; set a token to accept them through a host name",
                )
        return await handler(request)

    return guard
