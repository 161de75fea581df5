"""``sop-llm models check`` validates each llama_cpp model's GGUF file; ``models add`` takes a flag
for every field of a model spec."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from sop_llm.ops.cli import build_parser, main
from sop_llm.ops.cli.models import run_command
from sop_llm.ops.settings import Settings
from sop_llm.schemas.models import ModelSpec, SamplingDefaults
from tests.conftest import ROOT
from tests.providers import ggufbytes as gb


def models_file(tmp_path: Path, **paths: Path) -> Path:
    """A models file: an openai model, and a llama_cpp model per ``name=path``."""
    toml = '[models.gpt]\nprovider = "openai"\nmodel_id = "gpt-test"\n'
    for name, path in paths.items():
        toml += f'[models.{name}]\nprovider = "llama_cpp"\npath = "{path}"\n'
    out = tmp_path / "models.toml"
    out.write_text(toml)
    return out


@pytest.fixture
def good_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "good.gguf"
    path.write_bytes(gb.model())
    return path


def test_check_passes_a_usable_gguf_file(
    tmp_path: Path, good_gguf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "check", str(models_file(tmp_path, local=good_gguf))]) == 0
    out = capsys.readouterr()
    listed = [json.loads(line) for line in out.out.splitlines()]
    assert [m["name"] for m in listed] == ["gpt", "local"] and out.err == ""


def test_check_fails_for_a_missing_gguf_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere.gguf"
    assert main(["models", "check", str(models_file(tmp_path, local=missing))]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert f"sop-llm: models.local: cannot read {missing}: No such file or directory" in out.err


BROKEN = {
    "not_gguf": (b"<html>a login page, saved as a model</html>" * 4, "not a GGUF file"),
    "truncated": (gb.model()[:-10], "truncated"),
    "no_shape": (gb.gguf(gb.kv_str("general.architecture", "llama"), 1), "lacks block_count"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_check_fails_for_a_file_that_is_not_a_usable_gguf_model(
    tmp_path: Path, good_gguf: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data, problem = BROKEN[case]
    bad = tmp_path / f"{case}.gguf"
    bad.write_bytes(data)
    file = models_file(tmp_path, fine=good_gguf, bad=bad)
    assert main(["models", "check", str(file)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sop-llm: models.bad: {bad}: "), err
    assert problem in err[0]


def test_check_exits_non_zero_from_the_command_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"\0" * 64)
    done = subprocess.run(
        [sys.executable, "-m", "sop_llm.ops.cli", "models", "check",
         str(models_file(tmp_path, m=bad))],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "not a GGUF file" in done.stderr and "Traceback" not in done.stderr


def test_add_has_a_flag_for_every_spec_field() -> None:
    parser = build_parser()
    args = parser.parse_args(["models", "add"])
    flags = set(vars(args))
    # `v` is the wire version; `defaults` and `overridable` are set through their own flags
    for field in set(ModelSpec.model_fields) - {"v", "defaults"}:
        assert field in flags, f"models add has no flag for {field}"
    for field in SamplingDefaults.model_fields:
        assert field in flags, f"models add has no flag for defaults.{field}"


@pytest.fixture
def settings(redis_url: str, namespace: str) -> Settings:
    return Settings(redis_url=SecretStr(redis_url), namespace=namespace)


async def test_add_stores_the_llama_cpp_fields(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    argv = ["models", "add", "--name", "g", "--provider", "llama_cpp", "--path", "/m/g.gguf",
            "--n-batch", "128", "--n-threads", "2", "--n-gpu-layers", "-1", "--gpu-device", "1",
            "--context-window", "2048", "--chat-template-file", str(template)]  # fmt: skip
    args = build_parser().parse_args(argv)
    assert await run_command(settings, args) == 0
    capsys.readouterr()
    assert await run_command(settings, build_parser().parse_args(["models", "show", "g"])) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["n_batch"] == 128 and shown["n_threads"] == 2 and shown["gpu_device"] == 1
    assert shown["chat_template"] == template.read_text()


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (["--chat-template", "x", "--chat-template-file", "t.jinja"], "not both"),
        (["--chat-template-file", "/nonexistent/t.jinja"], "cannot read --chat-template-file"),
        (["--n-batch", "0"], "n_batch"),
    ],
)
async def test_add_refuses_bad_llama_cpp_flags(
    settings: Settings, extra: list[str], problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["models", "add", "--name", "g", "--provider", "llama_cpp", "--path", "/m.gguf"]
    assert await run_command(settings, build_parser().parse_args(argv + extra)) == 1
    assert problem in capsys.readouterr().err
