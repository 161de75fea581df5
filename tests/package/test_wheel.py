"""The wheel built from the tree holds one top-level package, `sop_llm` (the folders at the top
of the repository become its subpackages), and the README's Python example runs from it alone,
away from the repository's folders."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, SHARED_REDIS_URL

pytestmark = pytest.mark.slow  # builds a wheel: a few seconds, and PyPI for the build backend


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy: setuptools writes build/ into the tree it builds, and a build/ left
    # from an earlier layout would put stale packages into the wheel
    tree = tmp_path_factory.mktemp("tree") / "sop-llm"
    skip = shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".schemathesis"
    )
    shutil.copytree(ROOT, tree, symlinks=True, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(tree), "--no-deps", "-q", "-w", str(out)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    [found] = out.glob("sop_llm-*.whl")
    return found


def test_the_wheel_holds_one_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"sop_llm"}
    for sub in ("streams", "handlers", "providers", "gpu", "schemas", "ops"):
        assert f"sop_llm/{sub}/__init__.py" in names
    assert "sop_llm/ops/console_assets/index.html" in names  # package data too
    entry = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith("entry_points.txt")))
        .decode()
    )
    assert "sop-llm = sop_llm.ops.cli:main" in entry


def test_the_readme_example_runs_from_the_wheel(
    wheel: Path, tmp_path: Path, namespace: str
) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"From Python:\n\n```python\n(.*?)```", readme, re.S)
    assert example, "the README's Python example is missing"
    code = example.group(1).replace("redis://127.0.0.1:6379/0", SHARED_REDIS_URL)
    code = code.replace('namespace="sop"', f'namespace="{namespace}"')
    script = tmp_path / "example.py"
    script.write_text(
        "import asyncio\n\nasync def main():\n"
        + textwrap.indent(code, "    ")
        + "\n    print('DONE', result.state)\n\n"
        "async def run():\n    from sop_llm.testing import TestExecutor\n"
        f"    async with TestExecutor({{}}, namespace={namespace!r},\n"
        f"                            redis_url={SHARED_REDIS_URL!r}):\n"
        "        await main()\n\nasyncio.run(run())\n"
    )
    # the installed wheel first; the project's dependencies from this venv; not the repository
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONSAFEPATH": "1"}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DONE completed" in done.stdout
    imported = subprocess.run(
        [sys.executable, "-c", "import sop_llm; print(sop_llm.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert imported.startswith(str(target))
