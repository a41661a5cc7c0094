"""Engine pods of a deployed stack (marker `deployed`, kubectl target): the GPUs and EFA
devices the pod was given, and a /dev/shm at least the planner's minimum for its group."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.infra.probes import InfraHost

pytestmark = pytest.mark.deployed


def test_the_pod_sees_every_gpu_of_its_node(host: InfraHost, role_vars: dict[str, Any]) -> None:
    listed = host.check_output("nvidia-smi -L")
    assert len(re.findall(r"^GPU \d+:", listed, re.M)) == role_vars["gpus"], listed


def test_the_pod_has_its_efa_devices(host: InfraHost, role_vars: dict[str, Any]) -> None:
    wanted = role_vars["efa_devices"]
    if wanted == 0:
        pytest.skip("this deployment does not use EFA")
    devices = host.check_output("ls /dev/infiniband").split()
    assert len([d for d in devices if d.startswith("uverbs")]) == wanted, devices


def test_dev_shm_is_at_least_the_planned_minimum(
    host: InfraHost, role_vars: dict[str, Any]
) -> None:
    # POSIX df: the second line's second field is the size in 1024-byte blocks.
    size_kib = int(host.check_output("df -Pk /dev/shm").splitlines()[1].split()[1])
    assert size_kib * 1024 >= role_vars["min_shm_bytes"]
