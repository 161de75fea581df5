"""docs/gpu.md carries the GPU check's scripts verbatim: they must stay valid against gpu/."""

from __future__ import annotations

import ast
import re

import pytest

from sop_llm import gpu
from tests.conftest import ROOT

DOC = ROOT / "docs" / "gpu.md"


def script(name: str) -> str:
    match = re.search(rf"### `{re.escape(name)}`\n\n```python\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"{name} is missing from {DOC}"
    return match.group(1)


@pytest.mark.parametrize("name", ["make_random_gguf.py", "gpu_check.py"])
def test_the_documented_scripts_parse(name: str) -> None:
    compile(script(name), name, "exec")


def test_the_check_script_uses_the_public_gpu_api() -> None:
    tree = ast.parse(script("gpu_check.py"))
    names = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "sop_llm.gpu"
        for alias in node.names
    }
    assert names and names <= set(gpu.__all__)
