"""`sop-llm dead` with a dead letter that does not parse beside good ones: listed around,
purgeable by id, refused for requeue with a clear message; never fatal to the others."""

from __future__ import annotations

import argparse
import time

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from sop_llm.ops.cli import dead
from sop_llm.ops.settings import Settings
from sop_llm.schemas.errors import ErrorCode
from sop_llm.schemas.result import DeadLetter
from sop_llm.streams.dead import scan_dead
from sop_llm.streams.entries import text
from sop_llm.streams.keys import Keys


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sop-llm")
    dead.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["dead", *argv])


async def _letters(client: Redis, keys: Keys) -> tuple[str, str]:
    letter = DeadLetter(
        source_stream=keys.tasks("default", "normal"), entry_id="1-0", task_id="good",
        reason=ErrorCode.MAX_ATTEMPTS, message="gave up", fields={"data": "{}"},
        dead_at=int(time.time() * 1000),
    )  # fmt: skip
    good = await client.xadd(keys.dead, {"type": "task.dead", "data": letter.model_dump_json()})
    bad = await client.xadd(keys.dead, {"type": "task.dead", "data": '{"v": 1, "nonsense": 1}'})
    return text(good), text(bad)


async def test_a_dead_letter_that_does_not_parse_is_left_out_not_fatal(
    client: Redis, keys: Keys, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    good, bad = await _letters(client, keys)
    settings = Settings(redis_url=SecretStr(redis_url), namespace=keys.namespace)
    scan = await scan_dead(client, keys, page=1)  # across pages too
    assert [d.entry_id for d in scan.entries] == [good] and scan.unreadable == [bad]

    assert await dead.run_dead(settings, parse("list")) == 0
    out, err = capsys.readouterr()
    assert good in out and "task=good" in out and bad not in out
    assert f"1 dead letter(s) do not parse and are left out (purge them by id): {bad}" in err

    assert await dead.run_dead(settings, parse("requeue", bad)) == 1
    assert f"not requeued: {bad} does not parse" in capsys.readouterr().err

    assert await dead.run_dead(settings, parse("purge", bad)) == 0
    assert "1 dead letter(s) purged" in capsys.readouterr().out
    scan = await scan_dead(client, keys)
    assert [d.entry_id for d in scan.entries] == [good] and scan.unreadable == []
