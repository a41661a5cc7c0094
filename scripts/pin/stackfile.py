"""The image settings of a `Pulumi.<stack>.yaml`: pin them by digest, or verify the pins.

Which keys are images comes from stacks/schema.py (promotable string fields named `image`
or `*_image`), so an image setting added to the schema is pinned without touching this
file. The file is edited with ruamel.yaml round-trip: comments, order and quoting stay.
"""

from __future__ import annotations

import os
import re
import tempfile
import typing
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.scalarstring import ScalarString

from scripts.pin.registry import PinError, Resolver, parse_ref
from scripts.stack_document import dump_document, load_document
from stacks.parse import schema_fields
from stacks.schema import DERIVED_FIELDS, PROJECT, Settings

ROOT = Path(__file__).resolve().parents[2]
STACK_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
PLACEHOLDER = re.compile(r"^sha256:0+$")


class StackProblems(PinError):
    """Every problem found in one stack file, reported together."""

    def __init__(self, path: Path, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = [f"{path}: {len(problems)} image problem(s):", *(f"  - {p}" for p in problems)]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class ImageSetting:
    """One image value in the document, with the mapping that holds it (edited in place)."""

    path: str  # config key path as messages spell it: gateway.image
    parent: MutableMapping[str, Any]
    key: str  # the key in `parent`: qwen-vl-serving:... only at the top level

    @property
    def value(self) -> str:
        return str(self.parent[self.key])


def stack_path(stack: str, root: Path = ROOT) -> Path:
    """Pulumi.<stack>.yaml at the repository root; unknown stacks list the known ones."""
    if not STACK_NAME.match(stack):
        raise PinError(f"--stack {stack!r}: a stack name is letters, digits, `.`, `_`, `-`")
    path = root / f"Pulumi.{stack}.yaml"
    if not path.is_file():
        known = sorted(p.name[len("Pulumi.") : -len(".yaml")] for p in root.glob("Pulumi.*.yaml"))
        raise PinError(
            f"no stack {stack!r}: {path} does not exist (stacks: {', '.join(known) or 'none'})"
        )
    return path


def image_settings(config: MutableMapping[str, Any]) -> list[ImageSetting]:
    """Every image value present in a stack's `config:` mapping, in schema order."""
    return list(_walk(Settings, config, "", top_level=True))


def _walk(
    cls: type, raw: MutableMapping[str, Any], path: str, top_level: bool
) -> Iterator[ImageSetting]:
    for key, f, hint in schema_fields(cls):
        # Only top-level keys carry the project namespace (qwen-vl-serving:gateway).
        k = f"{PROJECT}:{key}" if top_level else key
        if (top_level and f.name in DERIVED_FIELDS) or k not in raw:
            continue
        where, tp = f"{path}.{key}" if path else key, _unoptional(hint)
        if tp is str and f.metadata.get("promotable") and _is_image_name(f.name):
            yield ImageSetting(where, raw, k)
        else:
            yield from _nested(tp, raw[k], where)


def _nested(tp: Any, value: Any, where: str) -> Iterator[ImageSetting]:
    """Images inside a section (serving) or a list of sections (serving.deployments)."""
    if _is_section(tp) and isinstance(value, MutableMapping):
        yield from _walk(tp, value, where, top_level=False)
    elif typing.get_origin(tp) is tuple and isinstance(value, list):
        item = typing.get_args(tp)[0]
        for i, entry in enumerate(value):
            yield from _nested(item, entry, f"{where}[{i}]")


def _unoptional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if type(None) in typing.get_args(tp) and len(args) == 1 else tp


def _is_image_name(name: str) -> bool:
    return name == "image" or name.endswith("_image")


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and is_dataclass(tp)


def pin(path: Path, resolver: Resolver) -> list[str]:
    """Pin every image of the file; all resolved or nothing written. Returns report lines."""
    document = load_document(path, PinError)
    settings = _settings_of(path, document)
    pinned: dict[str, str] = {}
    problems: list[str] = []
    for s in settings:
        try:
            ref = parse_ref(s.value)
            pinned[s.path] = ref.pinned(resolver.resolve(ref))
        except PinError as err:
            problems.append(f"{s.path}: {err}")
    if problems:
        raise StackProblems(path, [*problems, f"nothing written to {path.name}"])
    lines = [_change_line(s.path, s.value, pinned[s.path]) for s in settings]
    changed = [s for s in settings if pinned[s.path] != s.value]
    for s in changed:
        s.parent[s.key] = _same_style(s.parent[s.key], pinned[s.path])
    if changed:
        write_atomic(path, dump_document(document))
    lines.append(f"{path.name}: {len(changed)} of {len(settings)} image(s) changed")
    return lines


def _change_line(path: str, old: str, new: str) -> str:
    return f"{path}: {new}" + ("" if old == new else f" (was {old})")


def _same_style(old: Any, new: str) -> Any:
    # Keep a quoted scalar quoted the same way; preserve_quotes loaded it as a ScalarString.
    return type(old)(new) if isinstance(old, ScalarString) else new


def verify(path: Path, resolver: Resolver, fix: str) -> list[str]:
    """Check every pin against the registry; every problem is reported, then raised."""
    settings = _settings_of(path, load_document(path, PinError))
    lines: list[str] = []
    problems: list[str] = []
    for s in settings:
        try:
            lines.append(f"{s.path}: {_verified(s.value, resolver, fix)}")
        except PinError as err:
            problems.append(f"{s.path}: {err}")
    if problems:
        raise StackProblems(path, problems)
    return [*lines, f"{path.name}: all {len(settings)} image pin(s) match their registries"]


def _verified(value: str, resolver: Resolver, fix: str) -> str:
    ref = parse_ref(value)
    if ref.digest is None:
        raise PinError(f"{value} is not pinned by digest; run `{fix}` to pin it")
    if PLACEHOLDER.match(ref.digest):
        raise PinError(f"{value} has a placeholder digest (all zeros); run `{fix}` to resolve it")
    if ref.tag is None:
        raise PinError(f"{value} is pinned without a tag to check; write it as REPO:TAG@DIGEST")
    actual = resolver.resolve(ref)
    if actual != ref.digest:
        raise PinError(
            f"pinned {ref.digest} but {ref.unpinned} now resolves to {actual} (the tag moved); "
            f"check the new image, then run `{fix}` to pin it"
        )
    return f"{ref.digest} matches {ref.unpinned}"


def _settings_of(path: Path, document: CommentedMap) -> list[ImageSetting]:
    settings = image_settings(document["config"])
    if not settings:
        raise PinError(f"{path}: no image settings under `config:` (keys {PROJECT}:...)")
    wrong = [s.path for s in settings if not isinstance(s.parent[s.key], str)]
    if wrong:
        raise StackProblems(path, [f"{p}: must be an image reference string" for p in wrong])
    return settings


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` by a rename, so a reader never sees half a file (mode kept)."""
    target = path.resolve()  # a symlinked stack file keeps its link
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    temp = Path(name)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        temp.chmod(target.stat().st_mode & 0o7777)
        temp.replace(target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
