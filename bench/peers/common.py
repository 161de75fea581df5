"""The task every system runs: the payload, and the echo work done on it."""

from __future__ import annotations

import itertools
import json
import os
import time

PROMPT_WORDS = (
    "the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing matches "
    "between sphinxes of black quartz and a jovial band of lumberjacks packs my box with five "
    "dozen liquor jugs before the lazy dog wakes up and the fox runs home through the forest past "
    "the river where the mist hangs low over the water and the heron waits for fish at dawn while "
    "the village sleeps and the baker lights his oven for the morning bread that feeds everyone"
)
URL_ENV = "BENCH_REDIS_URL"
TTL_S = 86_400


def redis_url() -> str:
    return os.environ.get(URL_ENV, "redis://127.0.0.1:6379/0")


def payload(task_id: str) -> str:
    """The ~530-byte task JSON, byte for byte what bench/pipeline.py publishes to sop-llm."""
    return json.dumps(
        {"v": 1, "task_id": task_id, "model": "echo", "prompt": PROMPT_WORDS, "max_tokens": 16},
        separators=(",", ":"),
    )


def echo_result(data: str | bytes, worker: str) -> tuple[str, str]:
    """Parse the payload and build the result JSON (shaped like sop-llm's): (task_id, result)."""
    started = int(time.time() * 1000)
    task = json.loads(data)
    words = (task.get("prompt") or "").split()
    wanted = task.get("max_tokens") or 16
    out = list(itertools.islice(itertools.cycle(words), wanted)) if words else []
    finished = int(time.time() * 1000)
    result = json.dumps(
        {
            "v": 1, "task_id": task["task_id"], "state": "completed", "model": task["model"],
            "text": " ".join(out), "finish_reason": "length",
            "usage": {"input_tokens": len(words), "output_tokens": len(out)},
            "run_ms": finished - started, "worker": worker, "attempts": 1,
            "finished_at": finished,
        },
        separators=(",", ":"),
    )  # fmt: skip
    return task["task_id"], result
