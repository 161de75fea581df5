"""The GPU semaphore: a counting semaphore per physical device, shared through Redis.

Every process on a host that runs local models on device ``<host>:<index>`` takes a permit
before it generates. Holders sit in a zset with a lease deadline (server time) that a
background task pushes on every third of the lease while the permit is held; a holder that dies
stops renewing and its permit is freed when the lease runs out. Waiters queue in a second zset
ordered by ``(priority rank, arrival)``, so a high-priority task that arrives after a low one is
still served first; a waiter is granted a permit only when everyone ahead of it fits in the free
permits too. Waiters refresh their own short lease while they wait, so a dead waiter drops out of
the queue instead of blocking it.

Waiting is a loop of one atomic script call (sweep the dead, take a permit or keep the place)
and a ``BLPOP`` on the device's wake list, bounded by ``poll_s`` (jittered). A release pushes
wake tokens, so a freed permit is usually taken within a round trip; the bounded wait is what
notices a holder whose lease ran out (nobody releases a dead holder's permit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Final, Protocol

from redis.asyncio import Redis
from redis.exceptions import (
    ClusterDownError,
    ReadOnlyError,
    RedisClusterException,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sop_llm.gpu.lua import (
    ACQUIRE_SCRIPT,
    INSPECT_SCRIPT,
    MAX_RANK,
    RANK_SCALE,
    RELEASE_SCRIPT,
    RENEW_SCRIPT,
)
from sop_llm.schemas.errors import ErrorCode, SopError

log = logging.getLogger(__name__)

TRANSIENT_ERRORS: Final[tuple[type[BaseException], ...]] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    ReadOnlyError,
    RedisClusterException,
    OSError,
    TimeoutError,
)
"""Passing Redis trouble, retried by the semaphore's loops: the project's one list,
``streams.errors.TRANSIENT_ERRORS``, spelled out again because ``gpu`` may not import
``streams`` (``tests/gpu/test_semaphore.py`` holds the two equal). Any other answer is about
the command itself and ends the wait it concerns."""


def _describe(exc: BaseException) -> str:
    # class and message: redis-py 8's repr drops the message
    return f"{type(exc).__name__}: {exc}"


class SlotTimeoutError(SopError, TimeoutError):
    """No permit was free for this waiter within the time it was given."""

    code = ErrorCode.TIMEOUT


@dataclass(frozen=True, slots=True)
class Device:
    """A physical device: the host it is plugged into and its NVML/CUDA index."""

    host: str
    index: int

    def __str__(self) -> str:
        return f"{self.host}:{self.index}"


@dataclass(frozen=True, slots=True)
class DeviceKeys:
    """The Redis names of one device's semaphore; all must share one hash tag."""

    holders: str  # zset member -> lease deadline (ms)
    waiters: str  # zset member -> rank * 1e12 + arrival
    leases: str  # zset member -> waiter deadline (ms)
    seq: str  # arrival counter
    wake: str  # list of wake tokens


@dataclass(frozen=True, slots=True)
class SemaphoreConfig:
    """``permits``: 1 for an in-process llama.cpp model, N for a server with N parallel slots.
    ``lease_ms``: how long a silent holder (or waiter) keeps its place. ``poll_s``: the longest
    a waiter sleeps between attempts. ``command_timeout_s``: the deadline of each Redis call."""

    permits: int
    lease_ms: int = 10_000
    poll_s: float = 0.1
    command_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.permits < 1:
            raise ValueError("permits must be >= 1")
        if self.lease_ms < 100 or self.poll_s <= 0 or self.poll_s * 3000 > self.lease_ms:
            raise ValueError("need lease_ms >= 100 and 0 < poll_s <= lease_ms / 3000")
        if self.command_timeout_s <= 0:
            raise ValueError("command_timeout_s must be > 0")


@dataclass(slots=True)
class Slot:
    """A held permit. ``lost`` is set if the lease could not be kept (Redis was unreachable for a
    whole lease, or the holder was swept): the device may then be shared, so a careful caller
    stops its generation."""

    device: Device
    holder: str
    waited_s: float
    lost: asyncio.Event


@dataclass(frozen=True, slots=True)
class Holder:
    holder: str
    expires_in_ms: int


@dataclass(frozen=True, slots=True)
class Waiter:
    holder: str
    priority: int
    position: int


@dataclass(frozen=True, slots=True)
class SemaphoreState:
    device: Device
    permits: int
    holders: Sequence[Holder]
    waiters: Sequence[Waiter]


class Semaphore(Protocol):
    """A device slot. ``priority`` is a rank, 0 most urgent (the index of the task's partition);
    ``holder_id`` names the holder for operators (a suffix makes each acquisition unique)."""

    def slot(
        self, *, priority: int, holder_id: str, timeout: float
    ) -> AbstractAsyncContextManager[Slot]: ...


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class GpuSemaphore:
    """The cross-process semaphore of one device (see the module docstring)."""

    def __init__(
        self, *, client: Redis, keys: DeviceKeys, device: Device, config: SemaphoreConfig
    ) -> None:
        self._client = client
        self._keys = keys
        self._config = config
        self.device = device
        self._wake_ttl_ms = max(1000, int(config.poll_s * 2000))

    @property
    def permits(self) -> int:
        return self._config.permits

    @contextlib.asynccontextmanager
    async def slot(self, *, priority: int, holder_id: str, timeout: float) -> AsyncIterator[Slot]:
        """Hold a permit for the body of the ``async with``, renewing its lease meanwhile.

        Raises :class:`SlotTimeoutError` when no permit comes within ``timeout`` seconds,
        ``ValueError`` for a priority outside ``0..8999``, and what redis-py raises when Redis
        refuses the request (connection trouble, :data:`TRANSIENT_ERRORS`, is waited out).
        Leaving the block in any way (including cancellation) gives the permit back, or leaves
        the queue.
        """
        if not 0 <= priority <= MAX_RANK:
            raise ValueError(f"priority must be within 0..{MAX_RANK}")
        if not holder_id or timeout <= 0:
            raise ValueError("holder_id must be non-empty and timeout > 0")
        member = f"{holder_id}#{secrets.token_hex(4)}"
        started = time.monotonic()
        granted = False
        try:
            async with asyncio.timeout(timeout) as deadline:
                await self._wait(member, priority)
            granted = True
        except TimeoutError:
            if not deadline.expired():
                raise
            raise SlotTimeoutError(f"no GPU slot on {self.device} within {timeout:g} s") from None
        finally:
            if not granted:
                await self._release(member)
        slot = Slot(self.device, member, time.monotonic() - started, asyncio.Event())
        renewer = asyncio.create_task(self._keep(slot), name=f"gpu-lease {member}")
        try:
            yield slot
        finally:
            renewer.cancel()
            try:
                await asyncio.wait({renewer}, timeout=self._config.command_timeout_s)
            finally:
                await self._release(member)

    async def inspect(self) -> SemaphoreState:
        """Live holders and waiters (in the order they will be served). Raises what redis-py
        raises (connection trouble is one of :data:`TRANSIENT_ERRORS`)."""
        k = self._keys
        async with asyncio.timeout(self._config.command_timeout_s):
            reply = await INSPECT_SCRIPT(self._client, [k.holders, k.waiters, k.leases], [])
        assert isinstance(reply, list)
        now = int(_text(reply[0]))
        h, w = reply[1], reply[2]
        holders = [
            Holder(_text(h[i]), max(0, int(float(_text(h[i + 1]))) - now))
            for i in range(0, len(h), 2)
        ]
        waiters = [
            Waiter(_text(w[i]), int(float(_text(w[i + 1]))) // RANK_SCALE, i // 2)
            for i in range(0, len(w), 2)
        ]
        return SemaphoreState(self.device, self._config.permits, holders, waiters)

    async def _wait(self, member: str, priority: int) -> None:
        cfg, k = self._config, self._keys
        keys = [k.holders, k.waiters, k.leases, k.seq, k.wake]
        score = ""
        failures = 0
        while True:
            try:
                async with asyncio.timeout(cfg.command_timeout_s):
                    reply = await ACQUIRE_SCRIPT(
                        self._client,
                        keys,
                        [
                            member,
                            cfg.permits,
                            cfg.lease_ms,
                            cfg.lease_ms,
                            priority,
                            score,
                            self._wake_ttl_ms,
                        ],
                    )
                failures = 0
            except TRANSIENT_ERRORS as exc:
                failures += 1
                if failures == 1:
                    log.warning("gpu slot request failed", extra={"error": _describe(exc)})
                await asyncio.sleep(self._pause_s())
                continue
            assert isinstance(reply, list)
            if int(reply[0]) == 1:
                return
            score = _text(reply[1])
            await self._nap()

    async def _nap(self) -> None:
        """Block on the wake list for at most a jittered poll interval."""
        pause = self._pause_s()
        try:
            async with asyncio.timeout(pause + self._config.command_timeout_s):
                await self._client.blpop([self._keys.wake], timeout=pause)
        except TRANSIENT_ERRORS as exc:
            log.debug("gpu wake wait failed", extra={"error": _describe(exc)})
            await asyncio.sleep(pause)

    def _pause_s(self) -> float:
        # jitter keeps the waiters of many processes from polling in step
        return self._config.poll_s * random.uniform(0.75, 1.25)

    async def _keep(self, slot: Slot) -> None:
        """Renew the lease every third of it until cancelled; trouble is retried sooner."""
        cfg = self._config
        every = cfg.lease_ms / 3000
        delay = every
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(delay)
            try:
                async with asyncio.timeout(every):
                    kept = await RENEW_SCRIPT(
                        self._client, [self._keys.holders], [slot.holder, cfg.lease_ms]
                    )
            except TRANSIENT_ERRORS as exc:
                log.warning("gpu lease renewal failed", extra={"error": _describe(exc)})
                if time.monotonic() - renewed >= cfg.lease_ms / 1000 and not slot.lost.is_set():
                    self._lost(slot)  # the lease has run out by now: others may hold the device
                delay = every / 4
                continue
            except Exception:
                # the renewer's guard: a refusal will not pass, so the lease cannot be kept
                log.exception("gpu lease renewal refused")
                self._lost(slot)
                return
            delay, renewed = every, time.monotonic()
            if not kept:
                self._lost(slot)
                return

    def _lost(self, slot: Slot) -> None:
        log.error("gpu slot lost", extra={"device": str(self.device), "holder": slot.holder})
        slot.lost.set()

    async def _release(self, member: str) -> None:
        k = self._keys
        try:
            async with asyncio.timeout(self._config.command_timeout_s):
                await RELEASE_SCRIPT(
                    self._client,
                    [k.holders, k.waiters, k.leases, k.wake],
                    [member, self._wake_ttl_ms],
                )
        except TRANSIENT_ERRORS as exc:
            # the lease (or the waiter's place) runs out on its own
            log.warning(
                "gpu slot release failed", extra={"error": _describe(exc), "holder": member}
            )
        except Exception:
            # the release's guard: it runs on the way out of a slot, whose own outcome must not
            # be replaced by a refusal here; the lease runs out on its own all the same
            log.exception("gpu slot release refused", extra={"holder": member})
