"""Walking and validating against the generated AsyncAPI and OpenAPI documents."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

_DOC_URI = "urn:sop:doc"


def refs(node: object) -> Iterator[str]:
    """Every ``$ref`` in a document, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref}: only local references are used"
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def validate(doc: dict[str, Any], ref: str, instance: object) -> None:
    """Validate ``instance`` against the schema at ``ref`` (its own refs resolved in ``doc``)."""
    registry: Registry[Any] = Registry().with_resource(
        _DOC_URI, Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    Draft202012Validator({"$ref": _DOC_URI + ref}, registry=registry).validate(instance)
