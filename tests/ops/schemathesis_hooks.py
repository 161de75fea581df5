"""schemathesis hooks for ``tests/ops/test_schemathesis.py`` (``SCHEMATHESIS_HOOKS``).

One rule of a model spec relates two values, which no JSON Schema can state: an in-process
``llama_cpp`` model's ``concurrency`` and ``gpu_slots``, when given, equal its ``parallel``. The
document says so in words; a generated spec that breaks it is left out rather than counted as
"valid data refused" (the API's 422 for it is tested in tests/ops/test_http_api_admin.py).
"""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    body = case.body
    if case.operation.label != "POST /v1/models" or not isinstance(body, dict):
        return True
    if body.get("provider") != "llama_cpp":
        return True
    parallel = body.get("parallel", 1)
    return all(body.get(name) in (None, parallel) for name in ("concurrency", "gpu_slots"))
