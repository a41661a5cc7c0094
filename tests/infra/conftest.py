"""Parametrizes every role's checks over the hosts of an inventory that play that role.

The inventory (scripts/rehearsal/inventory.py) comes from $QVR_INVENTORY; without it the
suite is not collected at all (a plain `pytest` run has no hosts to check), and
scripts/verify.py is the way to run it. Each test module is named after its role
(test_engine_leader.py checks `engine-leader` hosts) and only modules whose role some
selected host plays are collected.

`host` is testinfra's Host for the inventory entry: `local://` inside a rehearsal namespace
(verify.py starts one pytest per namespace with `ip netns exec`, so host.socket sees that
namespace's sockets), `ssh://` for nodes, `kubectl://` for pods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import testinfra

from scripts.rehearsal.inventory import Host, Inventory, from_env, module_role
from tests.infra.probes import InfraHost

INVENTORY: Inventory | None = from_env()


def pytest_ignore_collect(collection_path: Path) -> bool:
    if INVENTORY is None:
        return True
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return False
    role = module_role(collection_path.name)
    return role is None or not INVENTORY.with_role(role)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "target" not in metafunc.fixturenames or INVENTORY is None:
        return
    role = module_role(metafunc.definition.path.name)
    hosts = INVENTORY.with_role(role) if role else []
    metafunc.parametrize("target", hosts, ids=[h.name for h in hosts], scope="module")


@pytest.fixture(scope="module")
def host(target: Host) -> InfraHost:
    return testinfra.get_host(target.spec)


@pytest.fixture(scope="module")
def role_vars(target: Host, request: pytest.FixtureRequest) -> dict[str, Any]:
    """What this module's role expects of the host (ports, names, rendered configs)."""
    role = module_role(request.path.name)
    assert role is not None
    return dict(target.roles[role])


@pytest.fixture(scope="session")
def secrets() -> dict[str, Any]:
    assert INVENTORY is not None
    return INVENTORY.secrets()
