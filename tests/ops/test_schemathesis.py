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
from pydantic import SecretStr
from redis.asyncio import Redis

from ops.sidecar import Sidecar
from streams.keys import Keys
from streams.topology import ensure_groups
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
