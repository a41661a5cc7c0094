"""Helpers shared by the eks_cluster tests of several layers."""

from __future__ import annotations

from typing import Any

from tests.support.harness import (
    StackRun,
)

# From the stack files: cluster name, public endpoint, system nodes (type, min, desired, max).
STACKS = {
    "dev": ("qwen-vl-dev", True, ("m7i.xlarge", 1, 2, 3)),
    "staging": ("qwen-vl-staging", True, ("m7i.xlarge", 2, 2, 4)),
    "prod": ("qwen-vl-prod", False, ("m7i.2xlarge", 3, 3, 6)),
}


# `efa-only` interfaces need VPC CNI >= 1.18.5 (see docs/reference/aws-efa.md#efa-interfaces).
EFA_ONLY_MIN_VPC_CNI = (1, 18, 5)


def cluster(run: StackRun) -> dict[str, Any]:
    return run.one("aws:eks/cluster:Cluster", "eks-cluster").inputs
