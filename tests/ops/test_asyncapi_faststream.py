"""FastStream's own tooling accepts docs/asyncapi.json (``faststream docs serve`` parses it with
the schema class below before serving it)."""

from __future__ import annotations

from faststream.specification.asyncapi.v3_0_0.schema import ApplicationSchema

from tests.conftest import ROOT


def test_faststream_reads_the_asyncapi_document() -> None:
    schema = ApplicationSchema.model_validate_json((ROOT / "docs" / "asyncapi.json").read_text())
    assert schema.servers is not None
    assert schema.servers["redis"].pathname == "/0"
