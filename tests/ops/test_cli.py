"""The ``sop-llm`` command line as a whole: its commands, its entry points and its event loop."""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from sop_llm.ops.cli import build_parser, main, runner
from tests.conftest import ROOT, spawn_cli, terminating, wait_for, worker_env

# one invocation of every command, with the arguments it requires
INVOCATIONS = {
    "up": ["up"],
    "worker": ["worker"],
    "sidecar": ["sidecar"],
    "submit": ["submit", "--prompt", "hi"],
    "status": ["status", "t1"],
    "tail": ["tail"],
    "cancel": ["cancel", "t1"],
    "dead": ["dead", "list"],
    "webhooks": ["webhooks", "dead"],
    "models": ["models", "list"],
    "replay": ["replay", "results"],
    "inspect": ["inspect"],
}


def test_every_command_is_registered_with_a_handler() -> None:
    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert list(commands.choices) == list(INVOCATIONS)
    for name, argv in INVOCATIONS.items():
        args = parser.parse_args(argv)
        assert args.command == name and asyncio.iscoroutinefunction(args.handler), name


def test_without_uvloop_a_failing_command_carries_no_import_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` now raises ImportError

    async def failing() -> int:
        raise RuntimeError("the command failed")

    with pytest.raises(RuntimeError, match="the command failed") as caught:
        runner(failing())
    # an error raised under `except ImportError` would carry it: "During handling of ..."
    assert caught.value.__context__ is None
    shown = "".join(traceback.format_exception(caught.value))
    assert "ImportError" not in shown and "During handling" not in shown


def test_the_runner_uses_uvloop_when_it_is_installed() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def on_uvloop() -> int:
        return int(isinstance(asyncio.get_running_loop(), uvloop.Loop))

    assert runner(on_uvloop()) == 1


def test_a_malformed_webhook_schedule_fails_every_command_at_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SOP_WEBHOOK_SCHEDULE_S", "5,soon")
    assert main(["status", "t1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sop-llm: invalid settings:") and "webhook_schedule_s" in err


def test_python_dash_m_runs_the_cli(redis_url: str, namespace: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sop_llm.ops.cli", "status", "no-such-task"],
        env=worker_env(redis_url, namespace), cwd=ROOT, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr == "no task no-such-task (never seen, or expired)\n"


def test_the_composition_root_imports_no_cli_module() -> None:
    code = (
        "import sys, sop_llm.ops.app; "
        "print(sorted(m for m in sys.modules if m.startswith('sop_llm.ops.cli')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
        check=True,
    )  # fmt: skip
    assert done.stdout == "[]\n"


async def test_a_worker_killed_by_a_native_crash_leaves_its_stacks_in_the_log(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """What a SIGSEGV or SIGILL in llama.cpp looks like: the process dies, but not silently."""
    log = tmp_path / "w.log"
    with terminating(spawn_cli(["worker"], worker_env(redis_url, namespace), log)) as proc:
        await wait_for(lambda: "worker started" in log.read_text(), 30)
        proc.send_signal(signal.SIGSEGV)
        code = await asyncio.to_thread(proc.wait, 20)
    assert code == -signal.SIGSEGV
    text = log.read_text()
    assert "Fatal Python error: Segmentation fault" in text
    assert "most recent call first" in text  # the stacks of its threads


def test_a_cli_submission_is_traced_when_tracing_is_on(redis_url: str, namespace: str) -> None:
    env = worker_env(redis_url, namespace, otel_exporter="console")
    done = subprocess.run(
        [sys.executable, "-m", "sop_llm.ops.cli", "submit", "--prompt", "traced"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert '"name": "publish ' in done.stdout + done.stderr  # the console exporter's span
