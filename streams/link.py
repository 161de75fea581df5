"""A lean RESP2 link to one Redis server, for the worker's hot commands.

The worker's per-batch commands (the blocking ``XREADGROUP``, the ``READ`` script, ``BEGIN_MANY``
and ``FINISH_MANY``) spend more CPU in redis-py's asyncio plumbing (pool checkout, timeouts,
retry wrappers, response callbacks) than in the socket calls themselves: about 53 µs per
command against 25 µs here (``docs/benchmarks.md``). A :class:`Link` is one connection with a
FIFO of waiting futures: commands are written as they come (pipelined; Redis answers in order)
and replies are parsed by ``hiredis`` as bytes arrive.

Semantics callers rely on:

* Replies are raw RESP2 (bytes, lists, ints, ``None``), the shapes redis-py returns for these
  commands without decoding. An error reply raises the exception redis-py would raise
  (``NoScriptError``, ``ResponseError``, ...).
* A command cancelled by its caller still runs in Redis; its reply is read and dropped, so the
  replies of the commands after it stay theirs.
* A call that does not complete within its timeout raises ``TimeoutError`` and closes the
  connection (the server is not answering). A connection that breaks fails every waiting call
  with ``ConnectionError``; nothing is sent twice. The next call connects again.

Only plain one-server clients (TCP or a Unix socket, with the URL's user, password and
database) get a link: TLS, Sentinel and Cluster keep redis-py (:meth:`Link.of` returns
``None``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any, Final, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

DEFAULT_TIMEOUT_S: Final = 15.0
DEFAULT_CONNECT_TIMEOUT_S: Final = 5.0


class _Wire(asyncio.Protocol):
    """One connection: writes commands, hands each parsed reply to the oldest waiter."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but offer its methods
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self.close(RedisConnectionError(f"protocol error from redis: {exc}"))
                return
            if reply is False:  # RESP2 has no booleans: False means "need more bytes"
                return
            if not self.waiters:
                self.close(RedisConnectionError("a reply nobody asked for"))
                return
            waiter = self.waiters.popleft()
            if waiter.done():  # its caller gave up: the reply is dropped
                continue
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(BaseParser.parse_error(str(reply)))  # type: ignore[no-untyped-call]
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"connection to redis lost: {exc or 'closed'}"))

    def send(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        if self.lost is not None or self.transport is None or self.transport.is_closing():
            raise RedisConnectionError("connection to redis is closed")
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.transport.write(hiredis.pack_command(args))
        self.waiters.append(waiter)
        return waiter

    def close(self, why: BaseException) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._fail(why)

    def _fail(self, why: BaseException) -> None:
        if self.lost is None:
            self.lost = why
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(why)

    @property
    def usable(self) -> bool:
        return self.lost is None and self.transport is not None and not self.transport.is_closing()


def _expire(wire: _Wire, command: object, limit: float) -> None:
    wire.close(RedisTimeoutError(f"redis did not answer {command!s} within {limit:g} s"))


class Link:
    """One pipelined connection to one Redis server (see the module docstring)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        name: str | None = None,
    ) -> None:
        self._host, self._port, self._path = host, port, path
        self._username, self._password, self._db = username, password, db
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        # CLIENT SETNAME takes printable ASCII without spaces: anything else becomes "_"
        self._name = "".join(c if "!" <= c <= "~" else "_" for c in name) if name else None
        self._wire: _Wire | None = None
        self._connecting = asyncio.Lock()
        self._closed = False

    @classmethod
    def of(cls, client: Any, *, name: str | None = None) -> Link | None:
        """A link to the server ``client`` talks to, or ``None`` when it is not a plain
        one-server client over TCP or a Unix socket (Cluster, Sentinel, TLS)."""
        if type(client) is not Redis:
            return None
        pool = client.connection_pool
        kind = pool.connection_class
        if kind not in (Connection, UnixDomainSocketConnection) or type(pool).__name__.startswith(
            "Sentinel"
        ):
            return None
        kw = pool.connection_kwargs
        if kw.get("credential_provider") is not None:
            return None
        return cls(
            host=str(kw.get("host") or "localhost"),
            port=int(kw.get("port") or 6379),
            path=kw.get("path") if kind is UnixDomainSocketConnection else None,
            username=kw.get("username"),
            password=kw.get("password"),
            db=int(kw.get("db") or 0),
            timeout_s=float(kw.get("socket_timeout") or DEFAULT_TIMEOUT_S),
            connect_timeout_s=float(kw.get("socket_connect_timeout") or DEFAULT_CONNECT_TIMEOUT_S),
            name=name,
        )

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    async def execute(self, *args: Any, timeout_s: float | None = None) -> Any:
        """Send one command and wait for its reply (see the module docstring for errors)."""
        wire = self._wire
        if wire is None or not wire.usable:
            wire = await self._connect()
        waiter, timer = self._send(wire, args, timeout_s)
        try:
            return await waiter
        finally:
            timer.cancel()

    def send_now(self, *args: Any, timeout_s: float | None = None) -> asyncio.Future[Any] | None:
        """Send one command at once, without yielding to the event loop, when the link is
        connected: the future of its reply, with the errors :meth:`execute` raises. ``None``
        when it is not connected (nothing was sent: use :meth:`execute`)."""
        wire = self._wire
        if wire is None or not wire.usable:
            return None
        waiter, timer = self._send(wire, args, timeout_s)
        waiter.add_done_callback(lambda _: timer.cancel())
        return waiter

    def _send(
        self, wire: _Wire, args: tuple[Any, ...], timeout_s: float | None
    ) -> tuple[asyncio.Future[Any], asyncio.TimerHandle]:
        waiter = wire.send(args)
        limit = self._timeout_s if timeout_s is None else timeout_s
        # a plain timer, cheaper than asyncio.timeout: when it fires the server is not
        # answering, and closing the connection fails this call and every other one waiting
        timer = asyncio.get_running_loop().call_later(limit, _expire, wire, args[0], limit)
        return waiter, timer

    async def evalsha(self, sha: str, keys: list[str] | tuple[str, ...], args: Any) -> Any:
        return await self.execute("EVALSHA", sha, len(keys), *keys, *args)

    async def aclose(self) -> None:
        self._closed = True
        if self._wire is not None:
            self._wire.close(RedisConnectionError("link closed"))
            self._wire = None

    async def _connect(self) -> _Wire:
        async with self._connecting:
            if self._closed:
                raise RedisConnectionError("link closed")
            if self._wire is not None and self._wire.usable:
                return self._wire
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    if self._path:
                        _, wire = await loop.create_unix_connection(_Wire, self._path)
                    else:
                        _, wire = await loop.create_connection(_Wire, self._host, self._port)
                    await self._hello(wire)
            except TimeoutError as exc:
                raise RedisTimeoutError("timed out connecting to redis") from exc
            except OSError as exc:
                raise RedisConnectionError(f"cannot connect to redis: {exc}") from exc
            self._wire = wire
            return wire

    async def _hello(self, wire: _Wire) -> None:
        """Authenticate and select the database (both must succeed), then name the connection
        (best effort: an ACL user may not be allowed ``CLIENT SETNAME``)."""
        setup: list[tuple[Any, ...]] = []
        if self._password is not None:
            auth = (self._username, self._password) if self._username else (self._password,)
            setup.append(("AUTH", *auth))
        if self._db:
            setup.append(("SELECT", self._db))
        waiters = [wire.send(cmd) for cmd in setup]
        naming = wire.send(("CLIENT", "SETNAME", self._name)) if self._name else None
        try:
            for waiter in waiters:
                await waiter
        except RedisError:
            wire.close(RedisConnectionError("connection set-up refused"))
            raise
        if naming is not None:
            with contextlib.suppress(RedisError):
                await naming
