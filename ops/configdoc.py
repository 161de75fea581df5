"""Renders docs/configuration.md from the Settings class, so the page cannot drift."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic_core import PydanticUndefined

from sop_llm.ops.settings import Settings

FOOTER = """
Removed settings: `SOP_FAST_LINK` is gone (workers use one Redis client, redis-py with hiredis,
for every command); a worker whose environment still sets it ignores it.
"""

HEADER = """# Configuration

Every setting is read from the environment with the `SOP_` prefix (or from a `.env` file in
the working directory). Lists are comma-separated. This page is generated from
`ops/settings.py` by `python -m sop_llm.ops.configdoc > docs/configuration.md`; a test fails
when it is
stale.

| variable | default | description |
|---|---|---|
"""


def _default(value: object) -> str:
    if value is PydanticUndefined or value is None:
        return ""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def render() -> str:
    rows = []
    for name, field in Settings.model_fields.items():
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `SOP_{name.upper()}` | `{_default(field.default)}` | {desc} |")
    return HEADER + "\n".join(rows) + "\n" + FOOTER


if __name__ == "__main__":
    sys.stdout.write(render())
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(render())
