"""Generates the configuration reference (docs/CONFIG.md) from the settings schema.

    python -m scripts.config_docs > docs/CONFIG.md        (or: make docs)

A test regenerates it and fails when the committed file differs, so the
reference cannot drift from the schema.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, Literal, Union

from stacks.parse import schema_fields, show
from stacks.schema import FOREIGN_KEYS, PROJECT, Secret, Settings, default_of

HEADER = f"""# Configuration reference

Generated from `stacks/schema.py` by `make docs`; do not edit by hand.

Keys live in `Pulumi.<stack>.yaml` under `config:`, namespaced `{PROJECT}:` (for example
`{PROJECT}:serving`), except `aws:region`. `[]` marks a list item; `.<name>` of a mapping is any
name. Promotable keys are copied by `python -m scripts.promote` from one stack to the next; the others
are stack-specific. Check a file with `make check STACK=<stack>`.

| key | type | default | description |
| --- | --- | --- | --- |
"""


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return f"{type_name(inner[0])} or null"
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is tuple:
        return f"list of {type_name(args[0])}"
    if origin in (Mapping, dict):
        return f"map of {type_name(args[1])}"
    if tp is Secret:
        return "secret"
    if dataclasses.is_dataclass(tp):
        return "object"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}[tp]


def _default(f: dataclasses.Field[Any]) -> str:
    value = default_of(f)
    if value is dataclasses.MISSING:
        return "**required**"
    if dataclasses.is_dataclass(value):
        return "see below"
    if isinstance(value, Mapping):
        return "`" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "`" if value else "`{}`"
    if isinstance(value, tuple):
        return "`[" + ", ".join(map(str, value)) + "]`"
    return f"`{show(value)}`"


def rows(cls: type, prefix: str) -> Iterator[str]:
    for key, f, tp in schema_fields(cls):
        if f.name == "stack":
            continue
        path = _key_path(prefix, key, f.name)
        doc = f.metadata["doc"] + (" *Promotable.*" if f.metadata["promotable"] else "")
        yield f"| `{path}` | {type_name(tp)} | {_default(f)} | {doc} |"
        nested = _nested(tp)
        if nested is not None:
            yield from rows(nested, path + ("[]" if typing.get_origin(tp) is tuple else ""))


def _key_path(prefix: str, key: str, field_name: str) -> str:
    if not prefix:
        foreign = {v: k for k, v in FOREIGN_KEYS.items()}
        return foreign.get(field_name, key)
    return f"{prefix}.{key}"


def _nested(tp: Any) -> type | None:
    if typing.get_origin(tp) is tuple:
        tp = typing.get_args(tp)[0]
    return tp if dataclasses.is_dataclass(tp) and isinstance(tp, type) else None


def render() -> str:
    return HEADER + "\n".join(rows(Settings, "")) + "\n"


if __name__ == "__main__":
    print(render(), end="")
