"""``sop-llm models add|list|show|remove|check``: register, list and remove models at run time,
check a models file (and the GGUF file of each of its ``llama_cpp`` models).

Runtime models live in the ``{ns}:models`` hash; workers pick changes up through
:class:`streams.models.ModelStore`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError
from redis.asyncio import Redis

from sop_llm.ops.connect import redis_client_for
from sop_llm.ops.settings import Settings
from sop_llm.providers.factory import ModelConfigError
from sop_llm.providers.gguf_shape import GgufError, read_shape
from sop_llm.providers.specs import load_specs_file
from sop_llm.schemas.models import (
    ALL_OVERRIDABLE,
    ModelSpec,
    ProviderKind,
    StructuredMode,
    describe_spec_error,
)
from sop_llm.streams.keys import Keys
from sop_llm.streams.models import ModelStore, wait_pickup

# flag -> spec field, for the fields a flag sets directly
_FIELDS = (
    ("provider", str),
    ("model_id", str),
    ("pool", str),
    ("concurrency", int),
    ("gpu_slots", int),
    ("gpu_device", int),
    ("context_window", int),
    ("timeout_s", float),
    ("base_url", str),
    ("api_key_env", str),
    ("structured_output", str),
    ("path", str),
    ("n_gpu_layers", int),
    ("n_threads", int),
    ("n_batch", int),
    ("parallel", int),
    ("chat_template", str),
)
_DEFAULTS = (("temperature", float), ("top_p", float), ("max_tokens", int), ("seed", int))


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``models add|list|show|remove|check``."""
    m = subparsers.add_parser("models", help="register, list and remove models")
    m.set_defaults(handler=run_command)
    sub = m.add_subparsers(dest="models_command", required=True)
    a = sub.add_parser("add", help="register (or replace) a model spec at run time")
    a.add_argument("--spec", help="a whole spec as JSON; flags given too override its fields")
    a.add_argument("--name")
    choices = {"provider": get_args(ProviderKind), "structured_output": get_args(StructuredMode)}
    for name, kind in _FIELDS:
        a.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=kind, choices=choices.get(name)
        )
    for name, kind in _DEFAULTS:
        a.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help="default")
    a.add_argument("--stop", action="append", help="default stop sequence (repeatable)")
    a.add_argument(
        "--chat-template-file",
        type=Path,
        help="llama_cpp: read the chat template (Jinja) from this file, instead of --chat-template",
    )
    a.add_argument(
        "--overridable",
        help=f"comma-separated parameters a task may set (default: {','.join(ALL_OVERRIDABLE)})",
    )
    a.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="return once every live worker of the model's pool has loaded it (or refused it)",
    )
    sub.add_parser("list", help="list runtime models (JSON lines)")
    s = sub.add_parser("show", help="print one runtime model's spec")
    s.add_argument("name")
    r = sub.add_parser("remove", help="forget a runtime model")
    r.add_argument("name")
    r.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="return once every live worker of the model's pool has dropped it",
    )
    c = sub.add_parser(
        "check",
        help="validate a TOML models file and each llama_cpp model's GGUF file (no Redis needed)",
    )
    c.add_argument("file")


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    """The spec ``models add`` describes. Raises ``ValueError`` with a one-line reason."""
    doc: dict[str, Any] = {}
    if args.spec:
        try:
            loaded = json.loads(args.spec)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--spec is not JSON: {exc.msg}") from exc
        if not isinstance(loaded, dict):
            raise ValueError("--spec must be a JSON object")
        doc.update(loaded)
    if args.name is not None:
        doc["name"] = args.name
    for name, _ in _FIELDS:
        value = getattr(args, name)
        if value is not None:
            doc[name] = value
    if args.chat_template_file is not None:
        if args.chat_template is not None:
            raise ValueError("give --chat-template or --chat-template-file, not both")
        try:
            doc["chat_template"] = args.chat_template_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read --chat-template-file: {exc}") from exc
    defaults = dict(doc.get("defaults") or {})
    for name, _ in _DEFAULTS:
        value = getattr(args, name)
        if value is not None:
            defaults[name] = value
    if args.stop:
        defaults["stop"] = list(args.stop)
    if defaults:
        doc["defaults"] = defaults
    if args.overridable is not None:
        doc["overridable"] = [p.strip() for p in args.overridable.split(",") if p.strip()]
    try:
        return ModelSpec.model_validate(doc)
    except ValidationError as exc:
        raise ValueError(describe_spec_error(exc)) from exc


async def check_files(specs: list[ModelSpec]) -> list[str]:
    """One line per ``llama_cpp`` model whose GGUF file is missing, unreadable, not GGUF, or
    lacks the header fields a worker reads to admit it (empty: every file is usable)."""
    problems: list[str] = []
    for spec in specs:
        if spec.provider != "llama_cpp" or spec.path is None:
            continue
        try:
            await asyncio.to_thread(read_shape, spec.path)
        except OSError as exc:
            problems.append(f"models.{spec.name}: cannot read {spec.path}: {exc.strerror or exc}")
        except GgufError as exc:  # its message names the file and the problem
            problems.append(f"models.{spec.name}: {exc}")
    return problems


def _out(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")


def _err(message: str) -> int:
    sys.stderr.write(f"sop-llm: {message}\n")
    return 1


async def run_command(settings: Settings, args: argparse.Namespace) -> int:
    """Run a ``models`` subcommand; returns the exit status (1: bad input or not found)."""
    command = args.models_command
    if command == "check":
        try:
            specs = load_specs_file(args.file)
        except ModelConfigError as exc:
            return _err(str(exc))
        problems = await check_files(specs)
        for problem in problems:
            _err(problem)
        if problems:
            return 1
        for declared in specs:
            _out(json.loads(declared.to_wire()))
        return 0
    spec: ModelSpec | None = None
    if command == "add":
        try:
            spec = spec_from_args(args)
        except ValueError as exc:
            return _err(f"invalid model spec: {exc}")
    client = redis_client_for(settings)
    store = ModelStore(client=client, keys=Keys(settings.namespace))
    try:
        if spec is not None:
            version = await store.put(spec)
            if not args.wait:
                _out({"added": spec.name, "version": version})
                return 0
            return await _await_pickup(client, settings, spec, version, args.wait, added=True)
        if command == "list":
            snap = await store.snapshot()
            for s in snap.specs:
                _out(json.loads(s.to_wire()))
            for name, reason in snap.invalid.items():
                _out({"name": name, "invalid": reason})
            return 0
        if command == "show":
            try:
                found = await store.get(args.name)
            except ValidationError as exc:
                return _err(
                    f"model {args.name!r}: stored spec is invalid: {exc.error_count()} error(s)"
                )
            if found is None:
                return _err(f"model {args.name!r} is not registered at run time")
            _out(found.model_dump(mode="json"))
            return 0
        if command == "remove":
            with contextlib.suppress(ValidationError):
                spec = await store.get(args.name)  # its pool, for --wait
            if not await store.remove(args.name):
                return _err(f"model {args.name!r} is not registered at run time")
            if not args.wait or spec is None:
                _out({"removed": args.name})
                return 0
            version = await store.version()
            return await _await_pickup(client, settings, spec, version, args.wait, added=False)
        sys.stderr.write(f"sop-llm: unknown models command {command!r}\n")
        return 2
    finally:
        await client.aclose()


async def _await_pickup(
    client: Redis, settings: Settings, spec: ModelSpec, version: int, wait_s: float, *, added: bool
) -> int:
    """Wait for the live workers of ``spec``'s pool to take store ``version``; 1 when some did
    not in time, or (``added``) took it but could not load the model."""
    keys = Keys(settings.namespace)
    try:
        state = await wait_pickup(client, keys, spec.name, spec.pool, version, timeout_s=wait_s)
    except TimeoutError as exc:
        return _err(str(exc))
    doc: dict[str, Any] = {"added" if added else "removed": spec.name, "version": version}
    doc.update(serving=list(state.serving), refused=list(state.refused))
    _out(doc)
    if not (state.serving or state.refused):
        sys.stderr.write(
            f"sop-llm: no live worker serves pool {spec.pool!r}: "
            f"{'the model loads' if added else 'nothing serves it'} when one starts\n"
        )
        return 0
    if added and state.refused:
        return _err(
            f"model {spec.name!r} did not load on {', '.join(state.refused)} (see their logs)"
        )
    if not added and state.serving:
        return _err(
            f"model {spec.name!r} is still served by {', '.join(state.serving)} "
            "(declared in their models file?)"
        )
    return 0
