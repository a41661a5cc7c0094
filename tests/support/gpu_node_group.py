"""Helpers shared by the gpu_node_group tests of several layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.harness import StackRun


@dataclass(frozen=True)
class Group:
    """One gpuNodeGroups entry of a stack file, with the catalog facts that follow from it."""

    stack: str
    name: str
    kind: str
    zone: str | None  # set for EFA groups
    scaling: tuple[int, int, int]
    disk_gib: int
    gpus: int
    efa: int  # EFA interfaces (docs/reference/aws-efa.md#efa-instance-types), 0 when efa is off

    @property
    def id(self) -> str:
        return f"{self.stack}-{self.name}"


# Instance facts written from docs/reference/aws-efa.md#efa-instance-types, never read from stacks/catalog.py: g6e.xlarge 1 L40S, no
# EFA; g6e.24xlarge 4 GPUs, 2 EFA; p5.48xlarge 8 GPUs, 32 EFA.
GROUPS = [
    Group("dev", "l40s", "g6e.xlarge", None, (0, 1, 1), 150, 1, 0),
    Group("staging", "l40s", "g6e.xlarge", None, (1, 2, 3), 300, 1, 0),
    Group("staging", "l40s-efa", "g6e.24xlarge", "us-east-1a", (0, 2, 2), 400, 4, 2),
    Group("prod", "l40s", "g6e.xlarge", None, (4, 4, 8), 300, 1, 0),
    Group("prod", "h100-efa", "p5.48xlarge", "us-east-1a", (2, 2, 2), 1000, 8, 32),
]


ZONES = {"dev": 2, "staging": 2, "prod": 3}


def by_id(groups: list[Group]) -> Any:
    return pytest.mark.parametrize("group", groups, ids=[g.id for g in groups])


def launch_template(runs: dict[str, StackRun], g: Group) -> dict[str, Any]:
    return runs[g.stack].one("aws:ec2/launchTemplate:LaunchTemplate", f"gpu-{g.name}-lt").inputs
