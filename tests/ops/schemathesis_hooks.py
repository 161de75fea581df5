"""schemathesis hooks for ``tests/ops/test_schemathesis.py`` (``SCHEMATHESIS_HOOKS``): the two
places where the API means something a schema cannot say, each narrowed to its operation.

* One rule of a model spec relates two values: an in-process ``llama_cpp`` model's
  ``concurrency`` and ``gpu_slots``, when given, equal its ``parallel``. The document says so in
  words; a generated spec that breaks it is left out rather than counted as "valid data
  refused" (the API's 422 for it is tested in tests/ops/test_http_api_admin.py).
* ``DELETE /v1/tasks/{task_id}`` cancels a task, and a cancelled task keeps its record (its
  state, ``cancelled``, is the answer its producer reads): that it is still found afterwards is
  the contract, not a "deleted resource still available" (``use_after_free`` stays on for the
  models, which a DELETE does remove).
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


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    cancelled = str(getattr(failure, "free", "")).startswith("DELETE /v1/tasks/")
    return not (failure.code == "ST301" and cancelled)
