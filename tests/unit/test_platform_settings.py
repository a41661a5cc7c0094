"""Settings the platform refuses, each with a message that names the key and the fix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from program.platform import gpu_shutdown_grace_seconds
from stacks.parse import SettingsError
from stacks.settings import load_stack_file
from tests.support.platform_checks import config_key, stack_variant

Edit = Callable[[dict[str, Any]], None]


def problems(tmp_path: Path, base: str, edit: Edit) -> list[str]:
    path = stack_variant(tmp_path, base, base, edit)
    with pytest.raises(SettingsError) as caught:
        load_stack_file(path)
    return [str(p) for p in caught.value.problems]


def group(config: dict[str, Any], index: int) -> dict[str, Any]:
    return config[config_key("gpuNodeGroups")][index]


def set_group(index: int, **values: Any) -> Edit:
    return lambda config: group(config, index).update(values)


def drop_group_key(index: int, key: str) -> Edit:
    return lambda config: group(config, index).pop(key)


def existing_network_without(zone: str) -> Edit:
    def edit(config: dict[str, Any]) -> None:
        zones = {"us-east-1a": "subnet-0a", "us-east-1b": "subnet-0b", "us-east-1c": "subnet-0c"}
        zones.pop(zone)
        config[config_key("network")] = {
            "mode": "existing",
            "vpcId": "vpc-0a",
            "privateSubnetIds": zones,
        }

    return edit


def set_section(key: str, **values: Any) -> Edit:
    return lambda config: config[config_key(key)].update(values)


def existing_cluster(config: dict[str, Any]) -> None:
    config[config_key("cluster")] = {"mode": "existing", "name": "shared"}


CASES = [
    pytest.param(
        "dev",
        set_group(0, efa=True, availabilityZone="us-east-1a"),
        "gpuNodeGroups[0].efa=true: g6e.xlarge has no EFA",
        id="efa-on-g6e.xlarge",
    ),
    pytest.param(
        "staging",
        drop_group_key(1, "availabilityZone"),
        "gpuNodeGroups[1].availabilityZone: required with efa: EFA needs one subnet in one AZ",
        id="efa-group-across-zones",
    ),
    pytest.param(
        "staging",
        set_group(1, availabilityZone="us-east-1c"),
        "gpuNodeGroups[1].availabilityZone=us-east-1c: must be one of the network's AZs: "
        "us-east-1a, us-east-1b",
        id="efa-zone-outside-the-vpc",
    ),
    pytest.param(
        "staging",
        existing_network_without("us-east-1a"),
        "gpuNodeGroups[1].availabilityZone=us-east-1a: must be one of the network's AZs: "
        "us-east-1b, us-east-1c",
        id="existing-network-has-no-subnet-in-the-efa-zone",
    ),
    pytest.param(
        "dev",
        set_group(0, minSize=3, desiredSize=1, maxSize=2),
        "gpuNodeGroups[0].minSize=3: must not exceed maxSize=2",
        id="min-above-max",
    ),
    pytest.param(
        "dev",
        set_group(0, instanceType="g7.12xlarge"),
        "gpuNodeGroups[0].instanceType=g7.12xlarge: unknown GPU instance type",
        id="unknown-instance-type",
    ),
    pytest.param(
        "staging",
        set_group(1, capacityType="capacityBlock"),
        "gpuNodeGroups[1].capacityReservationId: required when capacityType is capacityBlock",
        id="capacity-block-without-reservation",
    ),
    pytest.param(
        "dev",
        set_group(0, capacityType="capacityBlock", capacityReservationId="cr-0a"),
        "gpuNodeGroups[0].availabilityZone: required when capacityType is capacityBlock",
        id="capacity-block-without-zone",
    ),
    pytest.param(
        "dev",
        set_group(0, capacityReservationId="cr-0a"),
        "gpuNodeGroups[0].capacityReservationId=cr-0a: only used with capacityType: capacityBlock",
        id="reservation-without-capacity-block",
    ),
    pytest.param(
        # Qwen3-VL-32B in bf16: (32.76e9 + 0.595e9) x 2 bytes = 62.1 GiB -> 63, + 40 + 20.
        "staging",
        set_group(1, diskGib=100),
        "gpuNodeGroups[1].diskGib=100: too small for the weights qwen3-vl-32b cache on the node",
        id="disk-too-small-for-weights",
    ),
    pytest.param(
        "dev",
        set_group(0, labels={"node.kubernetes.io/lifecycle": "normal"}),
        "gpuNodeGroups[0].labels.node.kubernetes.io/lifecycle=normal: EKS refuses node group "
        "labels in the domains kubernetes.io",
        id="reserved-label-prefix",
    ),
    pytest.param(
        "dev",
        set_group(0, labels={"qwen-vl-serving/efa": "true"}),
        "gpuNodeGroups[0].labels.qwen-vl-serving/efa=true: set by the platform",
        id="platform-label-overridden",
    ),
    pytest.param(
        "dev",
        set_section("cluster", version="1.30"),
        "cluster.version=1.30: no pinned EKS add-on and Cluster Autoscaler versions",
        id="kubernetes-version-without-pins",
    ),
    pytest.param(
        "dev",
        existing_cluster,
        "network.mode=new: an existing cluster's nodes must join its own VPC",
        id="existing-cluster-in-a-new-vpc",
    ),
    pytest.param(
        "dev",
        set_section("network", cidr="10.20.0.0/24"),
        "network.cidr=10.20.0.0/24: too small: each of the 2 AZs would get a /26 private subnet",
        id="vpc-too-small",
    ),
]


@pytest.mark.parametrize(("base", "edit", "expected"), CASES)
def test_bad_platform_settings_are_refused_with_the_key(
    tmp_path: Path, base: str, edit: Edit, expected: str
) -> None:
    found = problems(tmp_path, base, edit)
    assert any(p.startswith(expected) for p in found), "\n".join(found)


def test_disk_message_gives_the_smallest_size_that_fits(tmp_path: Path) -> None:
    (found,) = [
        p for p in problems(tmp_path, "staging", set_group(1, diskGib=100)) if "diskGib" in p
    ]
    assert found.endswith("use at least 123")


def test_vpc_size_message_names_a_cidr_that_fits(tmp_path: Path) -> None:
    found = problems(tmp_path, "dev", set_section("network", cidr="10.20.0.0/24"))
    assert any(p.endswith("use a /20 or larger") for p in found), found


def test_gpu_shutdown_grace_covers_the_slowest_engine_drain(tmp_path: Path) -> None:
    def edit(config: dict[str, Any]) -> None:
        config[config_key("serving")]["deployments"][0]["shutdownTimeoutSeconds"] = 120

    settings = load_stack_file(stack_variant(tmp_path, "dev", "dev", edit))
    # 120 s drain + 15 s signal margin + 15 s for critical pods
    assert gpu_shutdown_grace_seconds(settings, settings.gpu_node_groups[0]) == 150
