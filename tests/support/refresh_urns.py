"""Rewrite tests/support/data/urns.json from the program as it is now (under mocks).

Run it only on purpose, after adding resources (or renaming one WITH a `pulumi.Alias`), then
read the diff: every line removed is a resource `pulumi up` would delete.

    .venv/bin/python -m tests.support.refresh_urns
"""

from __future__ import annotations

import json

from tests.support.harness import ROOT, run_stack

SNAPSHOT = ROOT / "tests" / "support" / "data" / "urns.json"
STACKS = ("dev", "staging", "prod")


def main() -> None:
    urns = {stack: sorted(r.urn for r in run_stack(stack).resources) for stack in STACKS}
    SNAPSHOT.write_text(json.dumps(urns, indent=1) + "\n")


if __name__ == "__main__":
    main()
