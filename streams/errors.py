"""Which Redis failures are passing trouble, the one list every loop retries on.

Connection trouble (refused, reset, timed out, a server still loading, a cluster or a Sentinel
pair in the middle of a failover) passes: the loops back off and try again. Anything else is an
answer about the command itself (``WRONGTYPE``, a script error, ``NOPERM``) and retrying it
cannot help: the caller ends the work it concerns instead.
"""

from __future__ import annotations

import logging
import time
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


def describe(exc: BaseException) -> str:
    """The exception's class and message for a log line (redis-py 8's ``repr`` drops it)."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


_log = logging.getLogger(__name__)


class RedisIncidents:
    """Connection trouble, logged once per incident for the whole process: one warning when the
    first loop or task meets it (with the cause, whose message names the address), one line
    with its duration when a call goes through again. Every loop and task reports here instead
    of logging on its own, so an outage is two lines, not one per task in flight."""

    def __init__(self) -> None:
        self._since: float | None = None
        self.target = ""
        """The server's address for the log (no password), set by the composition root."""

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def trouble(self, exc: BaseException, where: str) -> None:
        if self._since is None:
            self._since = time.monotonic()
            _log.warning(
                "redis unreachable",
                extra={"redis": self.target, "error": describe(exc), "where": where},
            )

    def recovered(self) -> None:
        if self._since is not None:
            down = round(time.monotonic() - self._since, 3)
            self._since = None
            _log.info("redis reachable again", extra={"redis": self.target, "down_s": down})


INCIDENTS: Final = RedisIncidents()
"""This process's one record of Redis trouble."""
