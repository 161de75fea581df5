"""Which Redis failures are passing trouble, the one list every loop retries on.

Connection trouble (refused, reset, timed out, a server still loading, a cluster or a Sentinel
pair in the middle of a failover) passes: the loops back off and try again. Anything else is an
answer about the command itself (``WRONGTYPE``, a script error, ``NOPERM``) and retrying it
cannot help: the caller ends the work it concerns instead.
"""

from __future__ import annotations

from typing import Final

from redis.exceptions import (
    ClusterDownError,
    ReadOnlyError,
    RedisClusterException,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

TRANSIENT_ERRORS: Final[tuple[type[BaseException], ...]] = (
    RedisConnectionError,  # BusyLoadingError, MasterNotFoundError and MaxConnectionsError too
    RedisTimeoutError,
    ClusterDownError,  # MasterDownError too
    TryAgainError,
    ReadOnlyError,  # a replica promoted under us answers writes with READONLY until we reconnect
    RedisClusterException,  # the cluster client's own "no node for this slot" and the like
    OSError,
    TimeoutError,
)
"""Exceptions that mean "Redis is not reachable right now": retry with backoff."""


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` is passing connection trouble rather than an answer to the command."""
    return isinstance(exc, TRANSIENT_ERRORS)


def describe(exc: BaseException) -> str:
    """The exception's class and message for a log line (redis-py 8's ``repr`` drops it)."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
