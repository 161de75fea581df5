"""JSON Schema -> GBNF, tighter than llama-cpp-python's own converter.

What it enforces beyond ``llama_cpp.llama_grammar.json_schema_to_gbnf`` (0.3.36):

* integers within ``minimum``/``maximum`` (and the exclusive forms), exactly, by digit ranges;
  numbers without a sign when the minimum is not negative;
* strings without raw control characters (JSON forbids them) and without lone surrogate
  escapes; ``minLength``/``maxLength`` as bounded repetition;
* objects without properties the schema did not name (unless ``additionalProperties`` allows
  them explicitly), required properties always present, in declared order;
* whitespace limited to one optional space, so a sampler cannot wander in blank space.

What it cannot enforce (``pattern``, ``multipleOf``, number bounds, ``uniqueItems``...) is left to
validation (``providers/structured.py``). Pure Python: it does not need llama.cpp.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from sop_llm.providers.errors import BadRequestError

# unbounded integers are limited to 15 digits (exact in a double)
MAX_INT_DIGITS: Final = 15
_MAX_INT: Final = 10**MAX_INT_DIGITS - 1

_BASE_RULES: Final = {
    "ws": '" "?',
    "hex": "[0-9a-fA-F]",
    # no raw control characters, no surrogates, nothing past U+10FFFF and nothing in the
    # planes 4-13, where Unicode has no characters at all: llama.cpp's grammar decodes bytes
    # that are not UTF-8 (leads F5-FF, encoded surrogates) into such values, and they would
    # come out as U+FFFD replacement characters, breaking maxLength; escapes, but no lone
    # surrogate escapes (\uD800-\uDFFF)
    "char": r'[^"\\\x00-\x1F\x7F\uD800-\uDFFF\U00040000-\U000DFFFF\U00110000-\U7FFFFFFF] '
    r'| "\\" (["\\/bfnrt] | "u" ([0-9a-cA-CefEF] hex hex hex | [dD] [0-7] hex hex))',
    "string": r'"\"" char* "\""',
    "int": '"-"? ("0" | [1-9] [0-9]{0,14})',
    "frac": '"." [0-9]{1,15}',
    "exp": "[eE] [-+]? [0-9]{1,3}",
    "number": "int frac? exp?",
    "boolean": '"true" | "false"',
    "null": '"null"',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" ws (string ":" ws value ("," ws string ":" ws value)*)? "}"',
    "array": '"[" ws (value ("," ws value)*)? "]"',
}
_DATE: Final = '[0-9]{4} "-" ("0" [1-9] | "1" [0-2]) "-" ("0" [1-9] | [12] [0-9] | "3" [01])'
_TIME: Final = (
    '([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,6})? '
    '("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])'
)
_Q: Final = r'"\""'
_FORMATS: Final = {
    "date": f"{_Q} {_DATE} {_Q}",
    "time": f"{_Q} {_TIME} {_Q}",
    "date-time": f"{_Q} {_DATE} [Tt ] {_TIME} {_Q}",
    "uuid": f'{_Q} hex{{8}} "-" hex{{4}} "-" hex{{4}} "-" hex{{4}} "-" hex{{12}} {_Q}',
}
_DEPENDS: Final = {
    "char": ("hex",),
    "string": ("char",),
    "number": ("int", "frac", "exp"),
    "value": ("object", "array", "string", "number", "boolean", "null"),
    "object": ("ws", "string", "value"),
    "array": ("ws", "value"),
}


def literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    out = []
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _rep(item: str, lo: int, hi: int | None) -> str:
    if hi is not None and hi == lo:
        return "" if lo == 0 else (item if lo == 1 else f"{item}{{{lo}}}")
    if hi is None:
        return f"{item}*" if lo == 0 else (f"{item}+" if lo == 1 else f"{item}{{{lo},}}")
    return f"{item}?" if (lo, hi) == (0, 1) else f"{item}{{{lo},{hi}}}"


def _same_length(lo: str, hi: str) -> str:
    """Digit strings of one length from ``lo`` to ``hi`` (``lo <= hi``)."""
    n = len(lo)
    if lo == hi:
        return literal(lo)
    if n == 1:
        return f"[{lo}-{hi}]"
    if lo[0] == hi[0]:
        return f"{literal(lo[0])} ({_same_length(lo[1:], hi[1:])})"
    parts = []
    first, last = int(lo[0]), int(hi[0])
    if lo[1:] != "0" * (n - 1):
        parts.append(f"{literal(lo[0])} ({_same_length(lo[1:], '9' * (n - 1))})")
        first += 1
    tail = None
    if hi[1:] != "9" * (n - 1):
        tail = f"{literal(hi[0])} ({_same_length('0' * (n - 1), hi[1:])})"
        last -= 1
    if first <= last:
        head = f"[{first}]" if first == last else f"[{first}-{last}]"
        parts.append(f"{head} {_rep('[0-9]', n - 1, n - 1)}".strip())
    if tail is not None:
        parts.append(tail)
    return " | ".join(parts)


def _non_negative(lo: int, hi: int) -> list[str]:
    parts = []
    for n in range(len(str(lo)), len(str(hi)) + 1):
        a = max(lo, 0 if n == 1 else 10 ** (n - 1))
        b = min(hi, 10**n - 1)
        if a <= b:
            parts.append(f"({_same_length(str(a), str(b))})")
    return parts


def int_range(minimum: int | None, maximum: int | None) -> str:
    """A GBNF expression for the integers in ``[minimum, maximum]`` (15 digits when open)."""
    if minimum is None and maximum is None:
        return _BASE_RULES["int"]
    lo = -_MAX_INT if minimum is None else minimum
    hi = _MAX_INT if maximum is None else maximum
    if lo > hi:
        raise BadRequestError(f"no integer satisfies minimum {minimum} and maximum {maximum}")
    parts = []
    if lo < 0:
        neg_hi, neg_lo = -lo, max(1, -hi) if hi < 0 else 1
        parts.append(f'"-" ({" | ".join(_non_negative(neg_lo, neg_hi))})')
    if hi >= 0:
        parts.extend(_non_negative(max(lo, 0), hi))
    return " | ".join(parts)


def _num(value: Any) -> float | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def int_bounds(schema: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """The smallest and largest integer ``schema`` allows (drafts 4 and 6+ exclusive forms)."""
    lows: list[int] = []
    highs: list[int] = []
    minimum, maximum = _num(schema.get("minimum")), _num(schema.get("maximum"))
    ex_min, ex_max = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if minimum is not None:
        lows.append(math.floor(minimum) + 1 if ex_min is True else math.ceil(minimum))
    if maximum is not None:
        highs.append(math.ceil(maximum) - 1 if ex_max is True else math.floor(maximum))
    if (x := _num(ex_min)) is not None:
        lows.append(math.floor(x) + 1)
    if (x := _num(ex_max)) is not None:
        highs.append(math.ceil(x) - 1)
    return (max(lows) if lows else None), (min(highs) if highs else None)


def _non_negative_number(schema: Mapping[str, Any]) -> bool:
    lows = [_num(schema.get("minimum")), _num(schema.get("exclusiveMinimum"))]
    return any(x is not None and x >= 0 for x in lows)


class _Builder:
    def __init__(self, root: Mapping[str, Any]) -> None:
        self._root = root
        self._rules: dict[str, str] = {}
        self._refs: dict[str, str] = {}

    def build(self) -> str:
        self._rules["root"] = ""  # reserved: the top-level rule is named after the schema's kind
        top = self.visit(self._root, "doc")
        lines = [f"root ::= {top}"]
        del self._rules["root"]
        lines.extend(f"{name} ::= {body}" for name, body in self._rules.items())
        return "\n".join(lines) + "\n"

    def _base(self, name: str) -> str:
        if name not in self._rules:
            self._rules[name] = _BASE_RULES[name]
            for dep in _DEPENDS.get(name, ()):
                self._base(dep)
        return name

    def _named(self, hint: str, body: str) -> str:
        name = re.sub(r"[^A-Za-z0-9-]+", "-", hint).strip("-").lower() or "r"
        stem, i = name, 1
        while name in self._rules or name in _BASE_RULES:
            i += 1
            name = f"{stem}-{i}"
        self._rules[name] = body
        return name

    def visit(self, schema: Any, hint: str) -> str:
        """A GBNF expression for ``schema`` (a rule name or a parenthesised body)."""
        if schema is True or schema == {}:
            return self._base("value")
        if not isinstance(schema, Mapping):
            raise BadRequestError(f"cannot build a grammar for schema {schema!r} at {hint}")
        if "$ref" in schema:
            return self._ref(str(schema["$ref"]))
        if "const" in schema:
            return literal(_dump(schema["const"]))
        if "enum" in schema:
            return "(" + " | ".join(literal(_dump(v)) for v in schema["enum"]) + ")"
        for key in ("anyOf", "oneOf"):
            if key in schema:
                alts = [self.visit(s, f"{hint}-{i}") for i, s in enumerate(schema[key])]
                return "(" + " | ".join(alts) + ")"
        if "allOf" in schema and len(schema["allOf"]) == 1:
            return self.visit({**schema["allOf"][0], **{k: v for k, v in schema.items()
                                                       if k != "allOf"}}, hint)  # fmt: skip
        kind = schema.get("type")
        if isinstance(kind, list):
            alts = [self.visit({**schema, "type": t}, f"{hint}-{t}") for t in kind]
            return "(" + " | ".join(alts) + ")"
        if kind is None and "properties" in schema:
            kind = "object"
        if kind == "object":
            return self._named(hint, self._object(schema, hint))
        if kind == "array":
            return self._named(hint, self._array(schema, hint))
        if kind == "string":
            return self._string(schema, hint)
        if kind == "integer":
            return self._named(hint, int_range(*int_bounds(schema)))
        if kind == "number":
            if _non_negative_number(schema):
                self._base("frac")
                self._base("exp")
                return self._named(hint, '("0" | [1-9] [0-9]{0,14}) frac? exp?')
            return self._base("number")
        if kind in ("boolean", "null"):
            return self._base(kind)
        return self._base("value")

    def _ref(self, ref: str) -> str:
        if ref in self._refs:
            return self._refs[ref]
        match = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", ref)
        defs = self._root.get(match.group(1)) if match else None
        if not match or not isinstance(defs, Mapping) or match.group(2) not in defs:
            raise BadRequestError(f"unsupported or unknown $ref {ref!r}")
        name = self._named(f"ref-{match.group(2)}", "")  # reserve the name: refs may recurse
        self._refs[ref] = name
        self._rules[name] = self.visit(defs[match.group(2)], f"{name}-body")
        return name

    def _string(self, schema: Mapping[str, Any], hint: str) -> str:
        fmt = schema.get("format")
        if fmt in _FORMATS:
            self._base("hex")
            return self._named(f"{hint}-{fmt}", _FORMATS[str(fmt)])
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        if lo == 0 and hi is None:
            return self._base("string")
        self._base("char")
        return self._named(hint, f'"\\"" {_rep("char", int(lo), hi)} "\\""'.replace("  ", " "))

    def _object(self, schema: Mapping[str, Any], hint: str) -> str:
        props: Mapping[str, Any] = schema.get("properties") or {}
        required = set(schema.get("required") or ())
        self._base("ws")
        extra = schema.get("additionalProperties")
        if not props:
            if isinstance(extra, Mapping) and extra:
                value = self.visit(extra, f"{hint}-value")
                kv = f'{self._base("string")} ":" ws {value}'
                return f'"{{" ws ({kv} ("," ws {kv})*)? "}}"'
            if extra is False:
                return '"{" ws "}"'
            return self._base("object")
        pairs = {
            key: f'{literal(json.dumps(key, ensure_ascii=False))} ":" ws '
            f"{self.visit(sub, f'{hint}-{key}')}"
            for key, sub in props.items()
        }
        req = [k for k in props if k in required]
        opt = [k for k in props if k not in required]
        if req:
            body = ' "," ws '.join(pairs[k] for k in req)
            body += "".join(f' ("," ws {pairs[k]})?' for k in opt)
        elif opt:
            # any in-order subset: the first one present, then the rest optional
            alts = [
                pairs[k] + "".join(f' ("," ws {pairs[o]})?' for o in opt[i + 1 :])
                for i, k in enumerate(opt)
            ]
            body = "(" + " | ".join(alts) + ")?"
        else:
            body = ""
        return f'"{{" ws {body} "}}"'

    def _array(self, schema: Mapping[str, Any], hint: str) -> str:
        self._base("ws")
        prefix: Sequence[Any] = schema.get("prefixItems") or ()
        if prefix:
            items = [self.visit(s, f"{hint}-{i}") for i, s in enumerate(prefix)]
            return '"[" ws ' + ' "," ws '.join(items) + ' "]"'
        item = self.visit(schema.get("items", True), f"{hint}-item")
        lo, hi = int(schema.get("minItems", 0)), schema.get("maxItems")
        if hi is not None and int(hi) == 0:
            return '"[" ws "]"'
        rest = _rep(f'("," ws {item})', max(lo - 1, 0), None if hi is None else int(hi) - 1)
        inner = f"{item} {rest}".strip()
        return f'"[" ws {inner} "]"' if lo >= 1 else f'"[" ws ({inner})? "]"'


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def schema_to_gbnf(schema: Mapping[str, Any]) -> str:
    """A GBNF grammar (root rule ``root``) whose every sentence is JSON matching ``schema`` as
    far as a context-free grammar can tell. Raises :class:`BadRequestError` for a schema it
    cannot express (an unknown ``$ref``, no integer in range)."""
    return _Builder(schema).build()
