"""Results as written: unknown token counts are ``null``, and the published schema says so."""

from __future__ import annotations

import json

import jsonschema
import pytest
from pydantic import ValidationError

from sop_llm.schemas.result import TaskResult, TaskState, Usage


def _written(usage: Usage) -> dict[str, object]:
    result = TaskResult(task_id="t", state=TaskState.COMPLETED, usage=usage, finished_at=1)
    parsed: dict[str, object] = json.loads(result.model_dump_json(exclude_none=True))
    return parsed


def test_unknown_counts_are_written_as_null_and_read_back() -> None:
    written = _written(Usage(input_tokens=None, output_tokens=3))
    assert written["usage"] == {"input_tokens": None, "output_tokens": 3}
    back = TaskResult.model_validate(written)
    assert back.usage == Usage(input_tokens=None, output_tokens=3)
    assert back.usage.total_tokens is None
    assert Usage(input_tokens=2, output_tokens=3).total_tokens == 5


@pytest.mark.parametrize("mode", ["serialization", "validation"])
def test_the_published_schema_takes_what_is_written(mode: str) -> None:
    schema = TaskResult.model_json_schema(mode=mode)  # type: ignore[arg-type]
    for usage in (Usage(input_tokens=None, output_tokens=None), Usage(input_tokens=4)):
        jsonschema.validate(_written(usage), schema)
    bad = {**_written(Usage()), "usage": {"input_tokens": -1, "output_tokens": 0}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    with pytest.raises(ValidationError):
        Usage.model_validate({"input_tokens": -1})
