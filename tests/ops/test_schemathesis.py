"""schemathesis against the document the sidecar serves: every operation, every check, no failure.

A real sidecar (with its token) and a real worker in this process, ``st run`` in a subprocess
against ``/openapi.json``: its examples, coverage, fuzzing and stateful phases, and all of its
checks (server errors, status codes, content types, headers and bodies conforming, schema-
violating requests refused and schema-valid ones accepted, authentication not ignored). The
seed is fixed, so a failure reproduces; ``SOP_SCHEMATHESIS_EXAMPLES`` widens the run.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
import requests
import schemathesis
from pydantic import SecretStr
from redis.asyncio import Redis
from schemathesis.core.failures import Failure

from sop_llm.ops.openapi import openapi_document
from sop_llm.ops.sidecar import Sidecar
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from sop_llm.streams.topology import ensure_groups
from tests.conftest import ROOT
from tests.harness import running_worker
from tests.ops.apicheck import settings_for

TOKEN = "schemathesis-token"
ST = Path(sys.executable).with_name("st")


async def _run_st(base: str, workdir: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        str(ST),
        "run",
        f"{base}/openapi.json",
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--checks",
        "all",
        "--max-examples",
        os.environ.get("SOP_SCHEMATHESIS_EXAMPLES", "25"),
        "--seed",
        "20260101",
        "--request-timeout",
        "5",
        "--workers",
        "1",
        "--no-color",
        cwd=workdir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={
            **os.environ,
            "SCHEMATHESIS_HOOKS": "tests.ops.schemathesis_hooks",
            "PYTHONPATH": str(ROOT),
        },
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 540)
    return proc.returncode or 0, out.decode(errors="replace")


@pytest.mark.timeout(600)
@pytest.mark.skipif(not ST.exists(), reason="schemathesis is not installed (the test extra)")
async def test_schemathesis_finds_no_failure(
    client: Redis, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    keys = Keys(namespace)
    settings = settings_for(
        redis_url,
        namespace,
        sidecar_token=SecretStr(TOKEN),
        # IP literals of any network pass the SSRF guard here, so that a generated webhook URL
        # is refused only for what the document says (names of this host stay refused: 422)
        webhook_allow=("0.0.0.0/0", "::/0"),
    )
    await ensure_groups(client, [keys.tasks("default", p) for p in settings.partitions], "workers")
    side = Sidecar(client=client, settings=settings, with_worker=False)
    # tasks of a model nobody serves fail at once rather than wait 30 s for it (their token
    # streams end, so a stream the stateful phase opens is answered in time)
    async with side.running(), running_worker(client, keys, unknown_model_grace_s=0.0):
        code, out = await _run_st(f"http://127.0.0.1:{side.port}", tmp_path)
    assert code == 0, out[-20000:]
    assert "No issues found" in out or " passed" in out, out[-5000:]


def _response(url: str, body: bytes) -> schemathesis.Response:
    """A recorded 200 ``text/event-stream`` answer holding ``body``."""
    request = requests.Request("GET", url).prepare()
    headers = {"content-type": ["text/event-stream"]}
    return schemathesis.Response(
        status_code=200, headers=headers, content=body, request=request, elapsed=0.01, verify=True
    )


async def test_the_token_stream_is_checked_event_by_event(
    client: Redis, redis_url: str, namespace: str
) -> None:
    """schemathesis reads the SSE answer as events and checks each ``data`` against the event's
    schema: a real stream passes, a stream with a malformed event fails."""
    keys = Keys(namespace)
    operation = schemathesis.openapi.from_dict(openapi_document())["/v1/tasks/{task_id}/stream"][
        "GET"
    ]
    side = Sidecar(client=client, settings=settings_for(redis_url, namespace))
    producer = Producer(ProducerConfig(namespace=namespace), client=client)
    async with side.running(), running_worker(client, keys):
        task_id = await producer.submit("echo", "one two three", max_tokens=3, stream=True)
        await producer.wait(task_id, timeout=10)
        url = f"http://127.0.0.1:{side.port}/v1/tasks/{task_id}/stream"
        real = await asyncio.to_thread(requests.get, url, timeout=10)
    assert real.status_code == 200 and "event: delta" in real.text and "event: end" in real.text
    operation.validate_response(real)
    for bad in (
        b'event: delta\ndata: {"txt": "x"}\n\n',  # not a TokenDelta
        b'event: end\ndata: {"state": "running"}\n\n',  # not a terminal state
        b"event: delta\ndata: not json\n\n",
        b'event: progress\ndata: {"text": "x"}\n\n',  # no such event
    ):
        with pytest.raises(Failure, match="SSE event violates schema"):
            operation.validate_response(_response(url, bad))
