"""The redis-cli examples of docs/wire-format.md, run verbatim against a private Redis."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

from redis.asyncio import Redis

from sop_llm.streams.keys import Keys
from tests.conftest import ROOT, RedisServer
from tests.harness import running_worker, wait_results

DOC = ROOT / "docs" / "wire-format.md"


def _blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", DOC.read_text(), flags=re.S)


async def _run(script: str, port: int, tmp: Path) -> str:
    real = shutil.which("redis-cli")
    assert real
    wrapper = tmp / "bin" / "redis-cli"
    wrapper.parent.mkdir(exist_ok=True)
    # the doc talks to "the" Redis; point redis-cli at the private server without editing a line
    wrapper.write_text(f'#!/bin/sh\nexec {real} -p {port} "$@"\n')
    wrapper.chmod(0o755)
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        script,
        env={"PATH": f"{wrapper.parent}:/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def test_doc_examples_run_verbatim(private_redis: RedisServer, tmp_path: Path) -> None:
    blocks = _blocks()
    assert len(blocks) == 3
    client = Redis.from_url(private_redis.url)
    try:
        async with running_worker(client, Keys("sop")):
            first = await _run(blocks[0], private_redis.port, tmp_path)
            assert "hello from redis-cli hello" in first
            assert first.strip().endswith("completed")
            second = await _run(blocks[1], private_redis.port, tmp_path)
            assert second.strip() == "completed"
            await wait_results(client, Keys("sop"), 2)
            third = await _run(blocks[2], private_redis.port, tmp_path)
            assert "hello-1" in third and "task.completed" in third
    finally:
        await client.aclose()
