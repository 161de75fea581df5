"""The worker's lean Redis link, against a real Redis: ordered pipelined replies, redis-py's
exceptions, cancelled and timed-out calls, broken connections, credentials and databases."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError

from streams.keys import Keys
from streams.link import Link
from streams.scripts import LuaScript
from tests.conftest import RedisServer, free_port


@pytest.fixture
async def link(client: Redis) -> AsyncIterator[Link]:
    made = Link.of(client, name=f"test-{uuid.uuid4().hex[:8]}")
    assert made is not None
    yield made
    await made.aclose()


async def test_only_plain_one_server_clients_get_a_link(redis_url: str) -> None:
    plain = Redis.from_url("redis://:pw@127.0.0.1:6390/4", socket_timeout=7)
    made = Link.of(plain)
    assert made is not None and made.timeout_s == 7
    assert Link.of(Redis.from_url("unix:///tmp/none.sock")) is not None
    assert Link.of(Redis.from_url("rediss://127.0.0.1:6390/0")) is None  # TLS
    assert Link.of(RedisCluster.from_url("redis://127.0.0.1:6390")) is None
    assert Link.of(object()) is None


async def test_concurrent_calls_get_their_own_replies_in_order(link: Link) -> None:
    replies = await asyncio.gather(*(link.execute("ECHO", f"m{i}") for i in range(300)))
    assert replies == [f"m{i}".encode() for i in range(300)]


async def test_error_replies_raise_what_redis_py_raises(
    link: Link, client: Redis, keys: Keys
) -> None:
    with pytest.raises(NoScriptError):
        await link.execute("EVALSHA", "0" * 40, 0)
    await client.set(keys.task("s"), "text")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await link.execute("HGET", keys.task("s"), "f")
    assert await link.execute("PING") == b"PONG"  # the connection is still good


@pytest.mark.parametrize("via_link", [True, False], ids=["link", "redis-py"])
async def test_a_script_unknown_to_the_server_is_loaded_and_run(
    link: Link, client: Redis, keys: Keys, via_link: bool
) -> None:
    marker = uuid.uuid4().hex  # a script the server has never seen: NOSCRIPT, load, run
    script = LuaScript("t", f"return {{KEYS[1], ARGV[1], '{marker}'}}")
    target = link if via_link else client
    assert await client.script_exists(script.sha) == [False]
    for arg in ("a", "b"):
        assert await script(target, [keys.task("k")], [arg]) == [
            keys.task("k").encode(), arg.encode(), marker.encode()
        ]  # fmt: skip
    assert await client.script_exists(script.sha) == [True]


async def test_send_now_writes_before_the_event_loop_runs(
    link: Link, redis_url: str, keys: Keys
) -> None:
    key = keys.task("now")
    sync = redis.Redis.from_url(redis_url)
    assert link.send_now("SET", key, "v") is None  # not connected yet: nothing sent
    assert sync.exists(key) == 0
    await link.execute("PING")
    sent = link.send_now("SET", key, "v")
    assert sent is not None
    # no await since: a blocking client sees the write, which left without the event loop
    deadline = time.monotonic() + 2
    while not sync.exists(key) and time.monotonic() < deadline:
        time.sleep(0.001)  # noqa: ASYNC251 - on purpose: the event loop must not run
    assert sync.get(key) == b"v"
    assert await sent == b"OK"
    sync.close()


async def test_a_script_sent_at_once_is_loaded_again_on_noscript(link: Link, keys: Keys) -> None:
    script = LuaScript("t", f"return {{KEYS[1], ARGV[1], '{uuid.uuid4().hex}'}}")
    await link.execute("PING")
    pending = script.send(link, [keys.task("k")], ["a"])  # sent now; the server answers NOSCRIPT
    reply = await pending
    assert reply[:2] == [keys.task("k").encode(), b"a"]
    assert await script.send(link, [keys.task("k")], ["b"]) == [*reply[:1], b"b", *reply[2:]]


async def test_a_cancelled_call_leaves_later_replies_to_their_callers(
    link: Link, keys: Keys
) -> None:
    blocked = asyncio.ensure_future(
        link.execute("XREAD", "BLOCK", 300, "STREAMS", keys.task("nothing"), "$")
    )
    await asyncio.sleep(0.05)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    # the XREAD still runs in Redis; its nil reply is read and dropped
    assert await link.execute("ECHO", "after") == b"after"
    assert await link.execute("PING") == b"PONG"


async def test_a_call_past_its_timeout_fails_and_the_link_connects_again(
    link: Link, keys: Keys
) -> None:
    first = await link.execute("CLIENT", "ID")
    t0 = time.monotonic()
    with pytest.raises(redis.exceptions.TimeoutError, match="did not answer XREAD"):
        await link.execute("XREAD", "BLOCK", 3000, "STREAMS", keys.task("x"), "$", timeout_s=0.2)
    assert time.monotonic() - t0 < 1.5
    assert await link.execute("PING") == b"PONG"
    assert await link.execute("CLIENT", "ID") != first  # a new connection


async def test_a_broken_connection_fails_waiting_calls_and_the_next_call_reconnects(
    link: Link, client: Redis, keys: Keys
) -> None:
    conn_id = await link.execute("CLIENT", "ID")
    name = await link.execute("CLIENT", "GETNAME")
    assert name is not None and name.startswith(b"test-")
    waiting = asyncio.ensure_future(
        link.execute("XREAD", "BLOCK", 5000, "STREAMS", keys.task("y"), "$")
    )
    await asyncio.sleep(0.05)
    assert await client.client_kill_filter(_id=conn_id) == 1
    with pytest.raises(redis.exceptions.ConnectionError, match="lost"):
        await asyncio.wait_for(waiting, 2)
    assert await link.execute("PING") == b"PONG"
    assert await link.execute("CLIENT", "ID") != conn_id


async def test_a_name_redis_would_refuse_is_made_acceptable(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    link = Link.of(client, name="worker one:read:défaut\n")
    assert link is not None
    assert await link.execute("CLIENT", "GETNAME") == b"worker_one:read:d_faut_"
    await link.aclose()
    await client.aclose()


async def test_an_unreachable_server_is_a_connection_error() -> None:
    link = Link(port=free_port(), connect_timeout_s=1)
    with pytest.raises(redis.exceptions.ConnectionError, match="cannot connect"):
        await link.execute("PING")


async def test_a_closed_link_refuses_calls(link: Link) -> None:
    assert await link.execute("PING") == b"PONG"
    await link.aclose()
    with pytest.raises(redis.exceptions.ConnectionError, match="closed"):
        await link.execute("PING")


async def test_password_and_database_come_from_the_client(private_redis: RedisServer) -> None:
    admin = redis.Redis(port=private_redis.port)
    admin.config_set("requirepass", "s3cret")
    admin.close()
    good = Link.of(Redis.from_url(f"redis://:s3cret@127.0.0.1:{private_redis.port}/3"))
    assert good is not None
    await good.execute("SET", "where", "db3")
    await good.aclose()
    check = redis.Redis(port=private_redis.port, password="s3cret", db=3)
    assert check.get("where") == b"db3"
    check.close()
    bad = Link.of(Redis.from_url(f"redis://:wrong@127.0.0.1:{private_redis.port}/0"))
    assert bad is not None
    with pytest.raises(AuthenticationError):
        await bad.execute("PING")


async def test_a_server_on_a_unix_socket(tmp_path: Path) -> None:
    exe = shutil.which("redis-server")
    assert exe, "redis-server is required on PATH"
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen(
        [exe, "--port", "0", "--unixsocket", str(sock), "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            if sock.exists():
                break
            await asyncio.sleep(0.02)
        link = Link.of(Redis.from_url(f"unix://{sock}?db=2"), name="unix")
        assert link is not None
        assert await link.execute("SET", "k", "v") == b"OK"
        await link.aclose()
        check = redis.Redis(unix_socket_path=str(sock), db=2)
        assert check.get("k") == b"v"
        check.close()
    finally:
        proc.terminate()
        proc.wait(10)


async def test_a_user_not_allowed_to_name_its_connection_still_connects(
    private_redis: RedisServer,
) -> None:
    admin = redis.Redis(port=private_redis.port)
    admin.acl_setuser(
        "worker", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-client"]
    )
    admin.close()
    url = f"redis://worker:pw@127.0.0.1:{private_redis.port}/0"
    link = Link.of(Redis.from_url(url), name="named")
    assert link is not None
    assert await link.execute("PING") == b"PONG"
    with pytest.raises(redis.exceptions.NoPermissionError):
        await link.execute("CLIENT", "GETNAME")
    await link.aclose()
