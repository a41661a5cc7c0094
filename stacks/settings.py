"""Loads a stack's settings: from the Pulumi engine, or straight from `Pulumi.<stack>.yaml`.

This is the only module that reads Pulumi config. Both paths feed the same
parser and rules, so `pulumi preview`, the scripts (check, rehearse, promote,
cost) and the tests see exactly the same settings. `secure:` values become
opaque `Secret`s: the file loader never decrypts them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from stacks.parse import Problem, SettingsError, parse
from stacks.rules import validate
from stacks.schema import FOREIGN_KEYS, PROJECT, Secret, Settings

__all__ = ["Settings", "SettingsError", "load_from_engine", "load_stack_file", "stack_file"]

ROOT = Path(__file__).resolve().parent.parent


def stack_file(stack: str) -> Path:
    return ROOT / f"Pulumi.{stack}.yaml"


def read_config(path: Path) -> Mapping[str, Any]:
    """The raw `config:` mapping of a stack file (secure values as written, never decrypted)."""
    source = str(path)
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SettingsError(source, [Problem("file", "no such stack file")]) from None
    except OSError as err:  # a directory, or a file this user may not read
        raise SettingsError(source, [Problem("file", f"cannot read it: {err.strerror}")]) from None
    except yaml.YAMLError as err:
        raise SettingsError(source, [Problem("file", f"not valid YAML: {err}")]) from None
    config = document.get("config") if isinstance(document, Mapping) else None
    if not isinstance(config, Mapping):
        raise SettingsError(source, [Problem("config", "the file has no `config:` mapping")])
    return config


def load_stack_file(path: str | Path) -> Settings:
    """Settings of a `Pulumi.<stack>.yaml` file, without the Pulumi engine."""
    path = Path(path)
    stack = path.name.removeprefix("Pulumi.").removesuffix(".yaml")
    values = {k: _file_value(k, v) for k, v in read_config(path).items()}
    return build(str(path), stack, values)


def _file_value(key: str, value: Any) -> Any:
    if isinstance(value, Mapping) and set(value) == {"secure"}:
        return Secret(key)
    return value


def load_from_engine() -> Settings:
    """Settings of the stack being deployed, from the config the Pulumi engine passed in."""
    import pulumi
    from pulumi.runtime import config as runtime_config

    values: dict[str, Any] = {
        **runtime_config.get_config_env(),
        **runtime_config.CONFIG.get(),
    }
    secret_keys = set(runtime_config.get_config_secret_keys_env())
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in secret_keys or runtime_config.is_config_secret(key):
            out[key] = Secret(key, pulumi.Output.secret(value))
        else:
            out[key] = _decode(value)
    return build(f"stack {pulumi.get_stack()}", pulumi.get_stack(), out)


def _decode(value: Any) -> Any:
    """The engine passes every value as a string; objects and scalars arrive JSON-encoded."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def build(source: str, stack: str, values: Mapping[str, Any]) -> Settings:
    """Parse and validate namespaced config values; raise one SettingsError with every problem."""
    prefix = f"{PROJECT}:"
    raw = {k.removeprefix(prefix): v for k, v in values.items() if k.startswith(prefix)}
    misplaced = [
        Problem(f"{prefix}{field}", f"set it as {foreign} (the AWS provider reads it there)")
        for foreign, field in FOREIGN_KEYS.items()
        if field in raw
    ]
    raw.update(
        {field: values[foreign] for foreign, field in FOREIGN_KEYS.items() if foreign in values}
    )
    settings, problems = parse(Settings, raw, {"stack": stack})
    if settings is not None and not misplaced and not problems:
        problems = validate(settings)
    if problems or misplaced or settings is None:
        raise SettingsError(source, misplaced + problems)
    return settings
