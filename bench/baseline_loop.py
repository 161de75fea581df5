"""The practical limit: a hand-written redis-py loop doing sop-llm's Redis writes, nothing more.

    python bench/baseline_loop.py --redis-url redis://127.0.0.1:6379/0 --namespace bench-1234

One consumer of the ``workers`` group on ``{ns}:tasks:default:normal``: ``XREADGROUP COUNT 256
BLOCK``, then for each entry parse ``data``, answer like the ``echo`` model (the prompt's words,
cycled to ``max_tokens``) and build a result JSON shaped like sop-llm's; then ONE pipeline per
batch with, per entry, ``HSET`` status (state, result, finished_at) + ``EXPIRE``, ``XADD``
results and ``XACK``. Two round trips per batch, no Lua, no running state, no idempotency, no
lease, no priority partitions: what sop-llm adds on top is what the benchmark prices.

Uses the synchronous client (hiredis parser) and the same key names as sop-llm (``Keys``), so the
Redis-side costs compare. Runs until SIGTERM/SIGINT; prints ``ready`` once the group exists.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import redis
from redis.typing import EncodableT, FieldT

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sop_llm.streams.keys import TASK_GROUP, Keys

DEFAULT_MAX_TOKENS = 16


def echo(prompt: str, max_tokens: int) -> tuple[str, int, int]:
    words = prompt.split()
    tokens = list(itertools.islice(itertools.cycle(words), max_tokens)) if words else []
    return " ".join(tokens), len(words), len(tokens)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--pool", default="default")
    ap.add_argument("--partition", default="normal")
    ap.add_argument("--count", type=int, default=256, help="XREADGROUP COUNT (batch size)")
    ap.add_argument("--block-ms", type=int, default=1000)
    ap.add_argument("--ttl-s", type=int, default=86_400)
    args = ap.parse_args()

    keys = Keys(args.namespace)
    stream = keys.tasks(args.pool, args.partition)
    consumer = f"loop-{os.getpid()}"
    r = redis.Redis.from_url(args.redis_url, socket_timeout=15)
    try:
        r.xgroup_create(stream, TASK_GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print("ready", flush=True)

    results, ttl = keys.results, args.ttl_s
    while not stop:
        reply: Any = r.xreadgroup(
            TASK_GROUP, consumer, {stream: ">"}, count=args.count, block=args.block_ms
        )
        if not reply:
            continue
        pipe = r.pipeline(transaction=False)
        for eid, fields in reply[0][1]:
            started = int(time.time() * 1000)
            task = json.loads(fields[b"data"])
            task_id = task["task_id"]
            wanted = task.get("max_tokens") or DEFAULT_MAX_TOKENS
            text, n_in, n_out = echo(task.get("prompt") or "", wanted)
            finished = int(time.time() * 1000)
            queued = max(0, started - int(eid.split(b"-", 1)[0]))
            result = json.dumps(
                {
                    "v": 1, "task_id": task_id, "state": "completed", "model": task["model"],
                    "text": text, "finish_reason": "length",
                    "usage": {"input_tokens": n_in, "output_tokens": n_out},
                    "queued_ms": queued, "run_ms": finished - started, "worker": consumer,
                    "attempts": 1, "finished_at": finished,
                },
                separators=(",", ":"),
            )  # fmt: skip
            status = keys.task(task_id)
            record: dict[FieldT, EncodableT] = {
                "state": "completed",
                "result": result,
                "finished_at": finished,
            }
            pipe.hset(status, mapping=record)
            pipe.expire(status, ttl)
            pipe.xadd(results, {"type": "task.completed", "data": result})
            pipe.xack(stream, TASK_GROUP, eid)
        pipe.execute()
    r.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
