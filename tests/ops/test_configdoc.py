from __future__ import annotations

from sop_llm.ops.configdoc import render
from tests.conftest import ROOT


def test_configuration_doc_is_current() -> None:
    current = (ROOT / "docs" / "configuration.md").read_text()
    assert current == render(), "regenerate: python -m sop_llm.ops.configdoc docs/configuration.md"


def test_every_setting_is_described() -> None:
    from sop_llm.ops.settings import Settings

    missing = [name for name, f in Settings.model_fields.items() if not f.description]
    assert missing == []
