"""Promote what runs from one stack to the next: python -m scripts.promote SRC DST.

Copies the settings marked `promotable=True` in stacks/schema.py (image digests, model
ids and revisions, serving and gateway options) from Pulumi.SRC.yaml into
Pulumi.DST.yaml, and never the stack-specific ones (sizes, counts, AZs, domains,
secrets). DST keeps its comments, key order and quoting; the change is printed as a
unified diff.

  python -m scripts.promote staging prod            promote, print the diff, write Pulumi.prod.yaml
  python -m scripts.promote staging prod --dry-run  all checks and the diff, nothing written
  python -m scripts.promote staging prod --check    exit 1 when prod is behind staging (CI drift check)

Refuses (exit 1, nothing written) when SRC has no passing verification record for its
current config (`python -m scripts.verify --stack SRC` writes it), or when the promoted DST
would fail validation or the capacity planner. Deployments are matched by name; one
that exists only in SRC is reported, not created, because its node group and sizes
are stack-specific: add it to DST by hand, then promote again.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import sys
import tempfile
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap

from scripts.stack_document import dump_document, load_document
from scripts.verification import RecordError, unverified_reason
from stacks.parse import SettingsError, schema_fields
from stacks.schema import DERIVED_FIELDS, PROJECT, Secret, Settings, default_of
from stacks.settings import ROOT, load_stack_file

# Deployments and node groups are list items identified by this key.
ITEM_KEY = "name"


class PromotionError(Exception):
    """A refusal: the message says why and what to do."""


@dataclass
class Promotion:
    """What promoting SRC into DST changes, and what it leaves alone on purpose."""

    changes: list[str] = field(default_factory=list)  # key paths whose DST value changed
    notes: list[str] = field(default_factory=list)  # unmatched list items, for the human


def promote(src: CommentedMap, dst: CommentedMap) -> Promotion:
    """Copy SRC's promotable values into DST's config (DST is modified in place)."""
    result = Promotion()
    _section(_Level(Settings, src["config"], dst["config"], "", top_level=True), result)
    return result


@dataclass(frozen=True)
class _Level:
    """One mapping of the schema walk: SRC's and DST's values for the same section."""

    cls: type
    src: Mapping[str, Any]
    dst: CommentedMap
    path: str
    top_level: bool = False

    def key(self, key: str) -> str:
        # Only top-level keys carry the project namespace (qwen-vl-serving:serving).
        return f"{PROJECT}:{key}" if self.top_level else key

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def insert(self, k: str, value: Any) -> None:
        """Add a key DST lacks after the last key that precedes it in schema order."""
        order = [self.key(key) for key, _, _ in schema_fields(self.cls)]
        before = set(order[: order.index(k)])
        position = max((i + 1 for i, key in enumerate(self.dst) if key in before), default=0)
        self.dst.insert(position, k, value)


def _section(level: _Level, result: Promotion) -> None:
    for key, f, tp in schema_fields(level.cls):
        if level.top_level and f.name in DERIVED_FIELDS:
            continue
        k = level.key(key)
        if f.metadata["promotable"]:
            _copy_value(level, k, f, result)
        elif _is_section(tp):
            _subsection(level, k, tp, result)
        else:
            item = _item_type(tp)
            src_items, dst_items = level.src.get(k), level.dst.get(k)
            if (
                item is not None
                and _has_promotable(item)
                and isinstance(src_items, list)
                and isinstance(dst_items, list)
            ):
                _items(item, src_items, dst_items, level.where(key), result)


def _copy_value(level: _Level, k: str, f: dataclasses.Field[Any], result: Promotion) -> None:
    src, dst = level.src, level.dst
    default = default_of(f)
    if k not in src and default is dataclasses.MISSING:
        return  # a required key SRC lacks: SRC is invalid and was refused before this
    # An absent key means the default, so SRC's effective value is compared and written.
    wanted = copy.deepcopy(src[k]) if k in src else _plain(default)
    current = dst[k] if k in dst else _plain(default)
    if current == wanted:
        return
    if k in dst:
        dst[k] = wanted  # replacing the value keeps the key's position and its comments
    else:
        level.insert(k, wanted)
    result.changes.append(level.where(k.removeprefix(f"{PROJECT}:")))


def _subsection(level: _Level, k: str, tp: type, result: Promotion) -> None:
    src_sub = level.src.get(k)
    dst_sub = level.dst.get(k)
    if dst_sub is not None and not isinstance(dst_sub, CommentedMap):
        return  # DST is malformed here; validation of the result reports it
    target = CommentedMap() if dst_sub is None else dst_sub
    where = level.where(k.removeprefix(f"{PROJECT}:"))
    sub = _Level(tp, src_sub if isinstance(src_sub, Mapping) else {}, target, where)
    _section(sub, result)
    if dst_sub is None and target:
        level.insert(k, target)


def _items(
    cls: type, src: Sequence[Any], dst: Sequence[Any], where: str, result: Promotion
) -> None:
    dst_by_name = {i.get(ITEM_KEY): i for i in dst if isinstance(i, CommentedMap)}
    src_names = {i.get(ITEM_KEY) for i in src if isinstance(i, Mapping)}
    for item in src:
        if not isinstance(item, Mapping):
            continue
        name = item.get(ITEM_KEY)
        if name in dst_by_name:
            _section(_Level(cls, item, dst_by_name[name], f"{where}[{name}]"), result)
        else:
            result.notes.append(
                f"{where}[{name}] exists only in the source: not created (its node group and "
                "sizes are stack-specific); add it by hand, then promote again"
            )
    result.notes.extend(
        f"{where}[{name}] exists only in the destination: left as it is"
        for name in dst_by_name
        if name not in src_names
    )


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type) and tp is not Secret


@functools.cache
def _has_promotable(cls: type) -> bool:
    """Whether a section holds any promotable field, at any depth (node groups do not)."""
    return any(
        f.metadata["promotable"]
        or (_is_section(tp) and _has_promotable(tp))
        or (_item_type(tp) is not None and _has_promotable(typing.cast(type, _item_type(tp))))
        for _, f, tp in schema_fields(cls)
    )


def _item_type(tp: Any) -> type | None:
    """The dataclass of a `tuple[Section, ...]` field, else None."""
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        return item if _is_section(item) else None
    return None


def _plain(value: Any) -> Any:
    """A schema default as YAML data (frozen mappings and tuples are not representable)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def unified_diff(before: str, after: str, name: str) -> str:
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True),
            after.splitlines(keepends=True),
            fromfile=f"{name} (current)",
            tofile=f"{name} (promoted)",
        )
    )


def _validate(dst: str, text: str) -> None:
    """Load the promoted file exactly as `pulumi up` would (parser, rules, planner)."""
    with tempfile.TemporaryDirectory() as tmp:
        # The file name carries the stack name, which some rules read.
        candidate = Path(tmp) / f"Pulumi.{dst}.yaml"
        candidate.write_text(text)
        try:
            load_stack_file(candidate)
        except SettingsError as err:
            problems = "\n".join(f"  - {p}" for p in err.problems)
            raise PromotionError(
                f"refusing: Pulumi.{dst}.yaml would be invalid after the promotion:\n{problems}"
            ) from None


def _check_source(src: str, src_file: Path, root: Path) -> None:
    try:
        load_stack_file(src_file)
    except SettingsError as err:
        raise PromotionError(f"refusing: the source stack is invalid:\n{err}") from None
    try:
        reason = unverified_reason(src, src_file, root / ".verify")
    except RecordError as err:
        raise PromotionError(f"refusing: {err}") from None
    if reason is not None:
        raise PromotionError(f"refusing: {reason}")


def run(src: str, dst: str, *, root: Path, check: bool, dry_run: bool) -> int:
    """The whole command; returns the exit status, prints for humans."""
    if src == dst:
        raise PromotionError(f"source and destination are both {src}")
    src_file, dst_file = root / f"Pulumi.{src}.yaml", root / f"Pulumi.{dst}.yaml"
    src_doc, dst_doc = (
        load_document(src_file, PromotionError),
        load_document(dst_file, PromotionError),
    )
    if not check:
        _check_source(src, src_file, root)
    before = dst_file.read_text()
    result = promote(src_doc, dst_doc)
    after = dump_document(dst_doc)
    for note in result.notes:
        print(f"note: {note}")
    if before == after:
        print(f"{dst_file.name} already has every promotable setting of {src_file.name}.")
        return 0
    print(unified_diff(before, after, dst_file.name), end="")
    print(f"{len(result.changes)} promotable setting(s) differ: {', '.join(result.changes)}")
    if check:
        print(f"{dst} is behind {src}: run `python -m scripts.promote {src} {dst}`.")
        return 1
    _validate(dst, after)
    if dry_run:
        print(f"dry run: {dst_file.name} not written.")
        return 0
    try:
        dst_file.write_text(after)
    except OSError as err:
        raise PromotionError(f"{dst_file}: {err.strerror}") from None
    print(f"wrote {dst_file}: review the diff, then open a pull request.")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.promote",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 done or nothing to do; 1 refused, or (--check) DST is behind SRC.",
    )
    parser.add_argument("src", help="stack to promote from (reads Pulumi.SRC.yaml)")
    parser.add_argument("dst", help="stack to promote to (rewrites Pulumi.DST.yaml)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 when a promotion would change DST",
    )
    mode.add_argument(
        "--dry-run",
        action="store_true",
        help="run every check and print the diff, but write nothing",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=ROOT,
        metavar="DIR",
        help="directory with the stack files and .verify/ (default: the repo)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args.src, args.dst, root=args.dir, check=args.check, dry_run=args.dry_run)
    except PromotionError as err:
        print(f"promote: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
