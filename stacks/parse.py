"""Turns a stack's raw config mapping into the frozen dataclasses of stacks/schema.py.

The walk is driven by the type hints of the schema, so adding a field to the
schema is all it takes to parse, type-check and document it. Every problem is
collected with its key path; nothing is built unless everything parsed.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, Union

from stacks.schema import Secret, default_of

NO_VALUE: Any = type("NoValue", (), {"__repr__": lambda _: "<no value>"})()


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a stack's config, with the fix."""

    path: str
    reason: str
    value: Any = NO_VALUE  # absent for missing keys and whole-list problems

    def __str__(self) -> str:
        if self.value is NO_VALUE:
            return f"{self.path}: {self.reason}"
        return f"{self.path}={show(self.value)}: {self.reason}"


class SettingsError(ValueError):
    """All problems of one stack config, raised once."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} configuration problem(s):"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


def show(value: Any) -> str:
    """A value as it appears in messages, in YAML spelling; secrets are never shown."""
    if isinstance(value, Secret):
        return str(value)
    if isinstance(value, str):
        return value if value and " " not in value else repr(value)
    if isinstance(value, Mapping):
        return "{...}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def camel(name: str) -> str:
    """The config key of a schema field: tensor_parallel → tensorParallel."""
    return re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), name)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def schema_fields(cls: type) -> list[tuple[str, dataclasses.Field[Any], Any]]:
    """(config key, field, resolved type) for each field of a schema dataclass."""
    hints = _hints(cls)
    return [(camel(f.name), f, hints[f.name]) for f in dataclasses.fields(cls)]


_INVALID: Any = object()


class _Walk:
    """One parse: accumulates problems while converting values."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def fail(self, path: str, value: Any, reason: str) -> Any:
        self.problems.append(Problem(path, reason, value))
        return _INVALID

    def value(self, tp: Any, raw: Any, path: str) -> Any:
        origin = typing.get_origin(tp)
        if isinstance(raw, Mapping) and set(raw) == {"secure"} and tp is not Secret:
            return self.fail(
                path,
                "<secure>",
                "secrets are only accepted as top-level keys "
                "(e.g. hfToken); move it there with `pulumi config set --secret`",
            )
        if origin in (Union, types.UnionType):
            return self._optional(tp, raw, path)
        if origin is Literal:
            return self._literal(tp, raw, path)
        if origin is tuple:
            return self._list(typing.get_args(tp)[0], raw, path)
        if origin in (Mapping, dict) or tp is Mapping:
            return self._map(typing.get_args(tp)[1], raw, path)
        if dataclasses.is_dataclass(tp) and isinstance(tp, type) and tp is not Secret:
            return self.section(tp, raw, path)
        return self._scalar(tp, raw, path)

    def _optional(self, tp: Any, raw: Any, path: str) -> Any:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if raw is None else self.value(inner[0], raw, path)

    def _literal(self, tp: Any, raw: Any, path: str) -> Any:
        allowed = typing.get_args(tp)
        if raw in allowed and type(raw) is type(allowed[0]):
            return raw
        return self.fail(path, raw, "must be one of " + ", ".join(map(str, allowed)))

    def _list(self, item: Any, raw: Any, path: str) -> Any:
        if not isinstance(raw, list):
            return self.fail(path, raw, "must be a list")
        items = [self.value(item, v, f"{path}[{i}]") for i, v in enumerate(raw)]
        return _INVALID if _INVALID in items else tuple(items)

    def _map(self, item: Any, raw: Any, path: str) -> Any:
        if not isinstance(raw, Mapping):
            return self.fail(path, raw, "must be a mapping of names to values")
        out = {str(k): self.value(item, v, f"{path}.{k}") for k, v in raw.items()}
        return _INVALID if _INVALID in out.values() else types.MappingProxyType(out)

    def _scalar(self, tp: Any, raw: Any, path: str) -> Any:
        if tp is Secret:
            if isinstance(raw, Secret):
                return raw
            return self.fail(path, raw, "must be a secret: `pulumi config set --secret ...`")
        ok = {
            bool: isinstance(raw, bool),
            int: isinstance(raw, int) and not isinstance(raw, bool),
            float: isinstance(raw, int | float) and not isinstance(raw, bool),
            str: isinstance(raw, str),
        }[tp]
        if not ok:
            return self.fail(path, raw, f"must be {_type_name(tp)}")
        return float(raw) if tp is float else raw

    def section(
        self, cls: type, raw: Any, path: str, preset: Mapping[str, Any] | None = None
    ) -> Any:
        if not isinstance(raw, Mapping):
            return self.fail(path, raw, "must be a mapping (a YAML object)")
        kwargs: dict[str, Any] = dict(preset or {})
        fields = [f for f in schema_fields(cls) if f[1].name not in kwargs]
        known = {key for key, _, _ in fields}
        unknown = [k for k in raw if k not in known]
        for key in unknown:
            self.fail(_join(path, str(key)), raw[key], _unknown_key(str(key), known))
        for key, f, tp in fields:
            if key in raw:
                kwargs[f.name] = self.value(tp, raw[key], _join(path, key))
            elif default_of(f) is dataclasses.MISSING:
                kwargs[f.name] = self.fail(
                    _join(path, key), NO_VALUE, f"required: {f.metadata['doc']}"
                )
        if unknown or _INVALID in kwargs.values():
            return _INVALID
        return cls(**kwargs)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]


def _unknown_key(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "known keys: " + ", ".join(sorted(known))
    return f"unknown key ({hint})"


def parse(
    cls: type, raw: Mapping[str, Any], preset: Mapping[str, Any]
) -> tuple[Any, list[Problem]]:
    """Parse `raw` (config keys without namespace) into `cls`; `preset` supplies derived fields."""
    walk = _Walk()
    result = walk.section(cls, raw, "", preset)
    return (None if result is _INVALID else result), walk.problems
