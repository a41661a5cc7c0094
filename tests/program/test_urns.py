"""Resource URNs are the identity of every resource in a stack's state: a change to one makes
`pulumi up` replace (delete and recreate) that resource. The snapshot in tests/support/data/urns.json
was taken under mocks before the floor-plan move; code moves must leave every URN unchanged.

A URN changes when a resource's type, name, parent chain or project/stack does. To change
one deliberately, add an alias (`pulumi.Alias`) to the resource and then refresh the snapshot.
"""

from __future__ import annotations

import json

import pytest

from tests.support.harness import ROOT, run_stack

SNAPSHOT = ROOT / "tests" / "support" / "data" / "urns.json"


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_the_program_registers_exactly_the_snapshot_urns(stack: str) -> None:
    expected = set(json.loads(SNAPSHOT.read_text())[stack])
    registered = {r.urn for r in run_stack(stack).resources}
    assert sorted(registered - expected) == [], "new URNs (a rename needs an alias)"
    assert sorted(expected - registered) == [], "URNs gone (those resources would be deleted)"
