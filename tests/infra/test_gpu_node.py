"""GPU nodes of a deployed stack (marker `deployed`, ssh target): what exists only on real
hardware, against the instance catalog: GPUs, EFA devices, the EFA driver's huge pages."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.infra.probes import InfraHost

pytestmark = pytest.mark.deployed


def test_every_gpu_of_the_instance_type_is_visible(
    host: InfraHost, role_vars: dict[str, Any]
) -> None:
    listed = host.check_output("nvidia-smi -L")
    assert len(re.findall(r"^GPU \d+:", listed, re.M)) == role_vars["gpus"], listed


def test_every_efa_device_is_present(host: InfraHost, role_vars: dict[str, Any]) -> None:
    wanted = role_vars["efa_devices"]
    if wanted == 0:
        pytest.skip("this node group does not use EFA")
    devices = host.check_output("ls /sys/class/infiniband").split()
    assert len(devices) == wanted, devices
    assert host.run("fi_info -p efa -t FI_EP_RDM").rc == 0  # libfabric sees the provider


def test_the_efa_huge_pages_are_allocated(host: InfraHost, role_vars: dict[str, Any]) -> None:
    wanted = role_vars["hugepages_mib"]
    if wanted == 0:
        pytest.skip("only EFA nodes pre-allocate huge pages")
    meminfo = dict(
        line.split(":", 1) for line in host.file("/proc/meminfo").content_string.splitlines()
    )
    pages = int(meminfo["HugePages_Total"])
    size_kib = int(meminfo["Hugepagesize"].split()[0])
    assert pages * size_kib // 1024 >= wanted
