"""The host list the testinfra suite (tests/infra) runs against, as a JSON file.

Written by the rehearsal (`<state dir>/inventory.json`) and by scripts/verify.py for real
clusters. Each host has a testinfra spec (`local://`, `ssh://10.0.1.5`,
`kubectl://pod?namespace=ns&container=c`) and, per role it plays, the values the
checks of that role expect (ports, model names, the rendered chrony.conf...). Secrets
stay out of it: `secrets_file` names a 0600 JSON file the checks read them from.

Standard library only: the suite loads it inside every rehearsal namespace.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

VERSION: Final = 1
INVENTORY_ENV: Final = "QVR_INVENTORY"  # path of the inventory the suite runs against
HOST_ENV: Final = "QVR_INVENTORY_HOST"  # only this host (the rehearsal runs one per namespace)

# Roles: one test module per role in tests/infra (test_<role with _>.py).
GATEWAY: Final = "gateway"
ENGINE_LEADER: Final = "engine-leader"
ENGINE_WORKER: Final = "engine-worker"
REDIS: Final = "redis"
PROMETHEUS: Final = "prometheus"
NODE: Final = "node"
# Only on real clusters (marker `deployed`): GPUs, EFA, huge pages, /dev/shm.
GPU_NODE: Final = "gpu-node"
ENGINE_POD: Final = "engine-pod"
ROLES: Final = (
    GATEWAY,
    ENGINE_LEADER,
    ENGINE_WORKER,
    REDIS,
    PROMETHEUS,
    NODE,
    GPU_NODE,
    ENGINE_POD,
)


class InventoryError(ValueError):
    pass


@dataclass(frozen=True)
class Host:
    name: str
    spec: str  # testinfra host spec, backend options in its query (?sudo=true&container=c)
    roles: Mapping[str, Mapping[str, Any]]  # role -> what its checks expect
    netns: str | None = None  # the rehearsal namespace the host lives in


@dataclass(frozen=True)
class Inventory:
    stack: str
    target: str
    hosts: tuple[Host, ...]
    secrets_file: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def with_role(self, role: str) -> list[Host]:
        return [h for h in self.hosts if role in h.roles]

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise InventoryError(f"no host {name!r} in the inventory of {self.stack}")

    def secrets(self) -> dict[str, Any]:
        if not self.secrets_file:
            return {}
        return json.loads(Path(self.secrets_file).read_text(encoding="utf-8"))


def parse(data: Mapping[str, Any]) -> Inventory:
    if data.get("version") != VERSION:
        raise InventoryError(f"unknown inventory version {data.get('version')!r}")
    hosts = []
    for raw in data["hosts"]:
        unknown = set(raw["roles"]) - set(ROLES)
        if unknown:
            raise InventoryError(f"host {raw['name']}: unknown roles {sorted(unknown)}")
        hosts.append(
            Host(
                name=raw["name"],
                spec=raw["spec"],
                roles=raw["roles"],
                netns=raw.get("netns"),
            )
        )
    known = {"version", "stack", "target", "hosts", "secrets_file"}
    return Inventory(
        stack=data["stack"],
        target=data["target"],
        hosts=tuple(hosts),
        secrets_file=data.get("secrets_file"),
        extra={k: v for k, v in data.items() if k not in known},
    )


def load(path: str | Path) -> Inventory:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InventoryError(f"{path}: no such inventory") from None
    except OSError as err:
        raise InventoryError(f"{path}: cannot read it: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise InventoryError(f"{path}: not JSON: {err}") from None
    return parse(data)


def from_env() -> Inventory | None:
    """The inventory named by $QVR_INVENTORY, restricted to $QVR_INVENTORY_HOST if set."""
    path = os.environ.get(INVENTORY_ENV)
    if not path:
        return None
    inventory = load(path)
    only = os.environ.get(HOST_ENV)
    if only:
        inventory = Inventory(
            stack=inventory.stack,
            target=inventory.target,
            hosts=(inventory.host(only),),
            secrets_file=inventory.secrets_file,
            extra=inventory.extra,
        )
    return inventory


def module_role(module_name: str) -> str | None:
    """`test_engine_leader.py` -> `engine-leader` (None when the module is not a role's)."""
    stem = Path(module_name).stem
    role = stem.removeprefix("test_").replace("_", "-")
    return role if stem.startswith("test_") and role in ROLES else None
