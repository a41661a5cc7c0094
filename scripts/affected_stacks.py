"""Which stacks a change affects, for the pull-request previews: changed paths in, JSON out.

  git diff --name-only origin/main...HEAD | python -m scripts.affected_stacks
  ["dev", "staging"]

A changed `Pulumi.<stack>.yaml` affects that stack; documentation, tests and
verification records affect none; anything else (components/, stacks/, policy/,
__main__.py, Pulumi.yaml, the lock, the workflows) is shared and affects every stack
that has a file in the repository. Standard library only, so CI can run it before any
virtualenv exists.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STACK_FILE = re.compile(r"^Pulumi\.(?P<stack>[A-Za-z0-9_.-]+)\.yaml$")
# Paths that cannot change what `pulumi preview` does.
INERT_PREFIXES = ("docs/", "tests/", ".verify/")
INERT_SUFFIXES = (".md",)


def stacks_in(root: Path) -> list[str]:
    """Stacks that have a file at the root of the repository, sorted."""
    return sorted(m["stack"] for p in root.iterdir() if (m := STACK_FILE.match(p.name)))


def affected(changed: Iterable[str], stacks: Sequence[str]) -> list[str]:
    """The stacks to preview for these changed paths (repository-relative)."""
    found: set[str] = set()
    for path in (p.strip() for p in changed):
        if not path or path.startswith(INERT_PREFIXES) or path.endswith(INERT_SUFFIXES):
            continue
        match = STACK_FILE.match(path)
        if match is None:
            return list(stacks)  # shared code or config: every stack may change
        if match["stack"] in stacks:  # a deleted stack file has nothing left to preview
            found.add(match["stack"])
    return [s for s in stacks if s in found]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.affected_stacks",
        description="Read changed paths (one per line) on stdin; print the affected stacks as JSON.",
    )
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="repository root (default: this one)"
    )
    args = parser.parse_args(argv)
    print(json.dumps(affected(sys.stdin, stacks_in(args.root))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
