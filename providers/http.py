"""The HTTP transport of the remote adapters (OpenAI, Anthropic, OpenAI-compatible servers).

Each SDK gets its own aiohttp-based client (the ``aiohttp`` extra of ``openai`` and
``anthropic``) whose connection pool is as large as the model's concurrency, every connection
kept alive between calls. The SDKs' default httpx client keeps at most 100 connections alive,
so past 100 calls at once it opens and closes connections call after call, and it spends a
fifth of the worker's time probing its pool; the aiohttp client scales with the number of
calls at less CPU per call (docs/benchmarks.md, ``bench/remote_concurrency.py``).

Faults below the SDK (a refused or dropped connection, a timeout, a body it could not decode)
are translated here, once for both adapters.
"""

from __future__ import annotations

import asyncio

import aiohttp
import httpx2

from sop_llm.providers.errors import InternalProviderError, ProviderError, ProviderTimeoutError
from sop_llm.providers.sanitize import Redaction

# an idle connection is dropped after this long: under the 5 s after which uvicorn (vLLM) and
# cpp-httplib (llama-server) close one by default, so that a call never goes out on a socket
# the server is closing at that moment (a POST is not resent: the call would fail)
KEEPALIVE_S = 4.0
# the most a new connection may take, whatever the read timeout
CONNECT_TIMEOUT_S = 10.0


def pool_limits(connections: int) -> httpx2.Limits:
    """A pool of ``connections`` connections, all kept alive (the model's concurrency: as many
    calls at once as the worker makes)."""
    if connections < 1:
        raise ValueError("connections must be >= 1")
    return httpx2.Limits(
        max_connections=connections,
        max_keepalive_connections=connections,
        keepalive_expiry=KEEPALIVE_S,
    )


def timeouts(timeout_s: float) -> httpx2.Timeout:
    """``timeout_s`` for every read, write and wait for a free connection; connecting is
    bounded by :data:`CONNECT_TIMEOUT_S` too."""
    return httpx2.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s))


def transport_error(
    exc: httpx2.HTTPError | ValueError, *, name: str, redaction: Redaction
) -> ProviderError:
    """A fault the SDK let through untranslated (raised while a stream is read, or a reply it
    could not decode: ``json.JSONDecodeError``) -> our tree. All are retryable."""
    if isinstance(exc, httpx2.TimeoutException) and hung_up(exc) is None:
        return ProviderTimeoutError(f"{name}: no reply within the timeout")
    if isinstance(exc, httpx2.HTTPError):
        return InternalProviderError(f"{name}: connection failed: {exc!r}", redaction=redaction)
    return InternalProviderError(f"{name}: malformed reply: {exc}", redaction=redaction)


def hung_up(exc: BaseException) -> BaseException | None:
    """The dropped connection behind ``exc``, when that is what it is. The openai SDK's aiohttp
    adapter reports a server that hung up without a reply as a connect *timeout*; the cause
    chain still holds aiohttp's own error, which says what happened."""
    seen: BaseException | None = exc
    for _ in range(8):  # the SDK's error, httpx's, aiohttp's: a short chain
        if seen is None:
            return None
        if isinstance(seen, aiohttp.ClientConnectionError) and not isinstance(
            seen, asyncio.TimeoutError
        ):
            return seen
        seen = seen.__cause__
    return None


__all__ = ["KEEPALIVE_S", "hung_up", "pool_limits", "timeouts", "transport_error"]
