"""Building blocks of the OpenAPI document: references, bodies, errors and operations.

Shared by :mod:`ops.openapi` (the document, the status and health endpoints) and
:mod:`ops.openapi.console_paths` (the console's API and pages).
"""

from __future__ import annotations

from typing import Any, Final

SCHEMA_REF: Final = "#/components/schemas/{model}"
BEARER: Final = "bearerAuth"

Json = dict[str, Any]


def ref(name: str) -> Json:
    return {"$ref": SCHEMA_REF.format(model=name)}


def response_ref(name: str) -> Json:
    return {"$ref": f"#/components/responses/{name}"}


def json_body(schema: Json, description: str, **extra: Any) -> Json:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
        **extra,
    }


def error(description: str) -> Json:
    return json_body(ref("Error"), description)


def query(name: str, schema: Json, description: str) -> Json:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema}  # fmt: skip


def path_param(name: str, schema: Json, description: str) -> Json:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": schema}  # fmt: skip


def operation(
    method: str,
    op_id: str,
    summary: str,
    responses: Json,
    *,
    tag: str,
    secured: bool = True,
    parameters: list[Json] | None = None,
    description: str | None = None,
    request_body: Json | None = None,
) -> Json:
    """``{method: <operation>}``. A secured operation answers 401 without the token; any that
    reads Redis may answer 503 (pass ``"503"`` in ``responses`` or leave it to the caller)."""
    op: Json = {"operationId": op_id, "summary": summary, "tags": [tag]}
    if description:
        op["description"] = description
    if parameters:
        op["parameters"] = parameters
    if request_body is not None:
        op["requestBody"] = request_body
    if secured:
        responses = {**responses, "401": response_ref("Unauthorized")}
    else:
        op["security"] = []  # open even when SOP_SIDECAR_TOKEN is set
    op["responses"] = dict(sorted(responses.items()))
    return {method: op}


def closed_object(properties: Json, required: list[str] | None = None, **extra: Any) -> Json:
    """A JSON object of exactly these properties (``required``: all of them by default)."""
    return {
        "type": "object",
        **extra,
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


def merge_paths(*groups: Json) -> Json:
    """Path items of several groups, the operations of one path merged."""
    out: Json = {}
    for group in groups:
        for path, item in group.items():
            out.setdefault(path, {}).update(item)
    return out
