"""`sop_llm.testing`: a user's own pytest, in a folder of its own, with no redis-server on PATH,
drives its code against the test double and gets real outcomes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

USER_TEST = '''
import time

import pytest

from sop_llm import ErrorCode, Producer, TaskState
from sop_llm.testing import TestExecutor


class RateLimited(Exception):
    pass


async def summarise(producer: Producer, text: str) -> str:
    """The user's own code under test."""
    task_id = await producer.submit("summarize", text, max_tokens=16)
    return task_id


@pytest.mark.asyncio
async def test_my_service() -> None:
    began = time.monotonic()
    async with TestExecutor({
        "summarize": "a short summary",
        "upper": lambda request: (request.prompt or "").upper(),
        "broken": ValueError("the model fell over"),
    }) as sop:
        started = time.monotonic() - began
        async with sop.producer() as producer:
            task_id = await summarise(producer, "a long text")
            done = await producer.wait(task_id, timeout=5)
            shout = await producer.wait(await producer.submit("upper", "hey"), timeout=5)
            broken = await producer.wait(await producer.submit("broken", "x"), timeout=5)
            streamed = await producer.submit("summarize", "y", stream=True)
            deltas = [d async for d in producer.stream(streamed)]
    assert done.state == TaskState.COMPLETED and done.text == "a short summary"
    assert done.usage is not None and done.usage.output_tokens == 3
    assert shout.text == "HEY"
    assert broken.state == TaskState.FAILED and broken.error is not None
    assert broken.error.code == ErrorCode.MAX_ATTEMPTS
    assert "".join(deltas) == "a short summary"
    assert sop.models["summarize"].requests[0].prompt == "a long text"
    print(f"STARTUP {started:.3f}")
    assert started < 1.0
'''


def test_a_user_test_runs_with_no_redis_server_on_path(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(USER_TEST)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOP_")}
    env.update(PATH=str(tmp_path / "no-bin"), PYTHONPATH=str(ROOT))  # nothing on PATH at all
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "-o", "asyncio_mode=strict", "test_user.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout
    assert "STARTUP " in done.stdout
