"""GPU node groups per stack: EFA interfaces, placement, SG, labels, taint, autoscaler tags, user data.

This module: the Pulumi program under mocks. The other layers' tests of the same code:
tests/artifacts/test_gpu_node_group.py, tests/unit/test_gpu_node_group.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.gpu_node_group import GROUPS, ZONES, Group, by_id, launch_template
from tests.support.harness import MOCK_CLUSTER_SECURITY_GROUP, StackRun, mock_asg_name, run_stack
from tests.support.platform_checks import (
    config_key,
    mock_id,
    stack_variant,
)

CA = "k8s.io/cluster-autoscaler"


TEMPLATE = f"{CA}/node-template"


EFA_GROUPS = [g for g in GROUPS if g.efa]


CLUSTERS = {"dev": "qwen-vl-dev", "staging": "qwen-vl-staging", "prod": "qwen-vl-prod"}


@pytest.fixture(scope="module")
def runs() -> dict[str, StackRun]:
    return {stack: run_stack(stack) for stack in ZONES}


def node_group(runs: dict[str, StackRun], g: Group) -> dict[str, Any]:
    return runs[g.stack].one("aws:eks/nodeGroup:NodeGroup", f"gpu-{g.name}-ng").inputs


def expected_autoscaler_tags(g: Group) -> dict[str, str]:
    tags = {
        f"{CA}/enabled": "true",
        f"{CA}/{CLUSTERS[g.stack]}": "owned",
        f"{TEMPLATE}/label/qwen-vl-serving/node-group": g.name,
        f"{TEMPLATE}/label/qwen-vl-serving/role": "gpu",
        f"{TEMPLATE}/label/qwen-vl-serving/efa": "true" if g.efa else "false",
        f"{TEMPLATE}/label/node.kubernetes.io/instance-type": g.kind,
        f"{TEMPLATE}/taint/nvidia.com/gpu": "true:NoSchedule",
        f"{TEMPLATE}/resources/nvidia.com/gpu": str(g.gpus),
    }
    if g.efa:
        tags[f"{TEMPLATE}/resources/vpc.amazonaws.com/efa"] = str(g.efa)
        tags[f"{TEMPLATE}/resources/hugepages-2Mi"] = (
            "10256Mi"  # 5128 x 2 MiB (docs/reference/aws-efa.md#hugepages)
        )
    return tags


@by_id(GROUPS)
def test_managed_node_group_shape(runs: dict[str, StackRun], group: Group) -> None:
    inputs = node_group(runs, group)
    lo, want, hi = group.scaling
    assert inputs["amiType"] == "AL2023_x86_64_NVIDIA"
    assert inputs["version"] == "1.33"  # the cluster's version (cluster.version in the stack file)
    assert inputs["capacityType"] == "ON_DEMAND"
    assert inputs["instanceTypes"] == [group.kind]
    assert inputs["scalingConfig"] == {"minSize": lo, "desiredSize": want, "maxSize": hi}
    assert inputs["launchTemplate"] == {"id": mock_id(f"gpu-{group.name}-lt"), "version": "1"}
    resource = runs[group.stack].one("aws:eks/nodeGroup:NodeGroup", f"gpu-{group.name}-ng")
    assert resource.ignore_changes == ["scalingConfig.desiredSize"]


@by_id(GROUPS)
def test_labels_and_gpu_taint(runs: dict[str, StackRun], group: Group) -> None:
    inputs = node_group(runs, group)
    assert inputs["labels"] == {
        "qwen-vl-serving/node-group": group.name,
        "qwen-vl-serving/role": "gpu",
        "qwen-vl-serving/efa": "true" if group.efa else "false",
    }
    assert inputs["taints"] == [{"key": "nvidia.com/gpu", "value": "true", "effect": "NO_SCHEDULE"}]


@by_id(GROUPS)
def test_autoscaler_tags_let_the_group_scale_from_zero(
    runs: dict[str, StackRun], group: Group
) -> None:
    tags = node_group(runs, group)["tags"]
    expected = expected_autoscaler_tags(group)
    assert {k: v for k, v in tags.items() if k.startswith(CA)} == expected


@by_id(GROUPS)
def test_node_template_tags_are_copied_to_the_auto_scaling_group(
    runs: dict[str, StackRun], group: Group
) -> None:
    asg_tags = [
        r.inputs
        for r in runs[group.stack].of_type("aws:autoscaling/tag:Tag")
        if r.name.startswith(f"gpu-{group.name}-asg-")
    ]
    expected = {k: v for k, v in expected_autoscaler_tags(group).items() if k.startswith(TEMPLATE)}
    assert {t["tag"]["key"]: t["tag"]["value"] for t in asg_tags} == expected
    for tag in asg_tags:
        assert tag["autoscalingGroupName"] == mock_asg_name(f"gpu-{group.name}-ng")
        assert tag["tag"]["propagateAtLaunch"] is False


@by_id(GROUPS)
def test_root_volume_is_gp3_sized_from_settings(runs: dict[str, StackRun], group: Group) -> None:
    (mapping,) = launch_template(runs, group)["blockDeviceMappings"]
    assert mapping["deviceName"] == "/dev/xvda"
    assert mapping["ebs"]["volumeSize"] == group.disk_gib
    assert mapping["ebs"]["volumeType"] == "gp3"
    assert mapping["ebs"]["throughput"] == 1000


@by_id(EFA_GROUPS)
def test_every_efa_interface_the_type_has(runs: dict[str, StackRun], group: Group) -> None:
    interfaces = launch_template(runs, group)["networkInterfaces"]
    assert len(interfaces) == group.efa  # one per network card: 32 on p5.48xlarge
    assert sorted(i["networkCardIndex"] for i in interfaces) == list(range(group.efa))
    primary = next(i for i in interfaces if i["networkCardIndex"] == 0)
    assert (primary["interfaceType"], primary["deviceIndex"]) == ("efa", 0)
    for interface in interfaces:
        if interface is not primary:
            assert (interface["interfaceType"], interface["deviceIndex"]) == ("efa-only", 1)
            assert "associatePublicIpAddress" not in interface


@by_id(EFA_GROUPS)
def test_efa_nodes_have_no_public_ip_and_sgs_only_on_interfaces(
    runs: dict[str, StackRun], group: Group
) -> None:
    template = launch_template(runs, group)
    interfaces = template["networkInterfaces"]
    public = {i["networkCardIndex"]: i.get("associatePublicIpAddress") for i in interfaces}
    assert public[0] == "false"
    assert "vpcSecurityGroupIds" not in template
    efa_sg = mock_id(f"gpu-{group.name}-efa-sg")
    for interface in interfaces:
        assert interface["securityGroups"] == [MOCK_CLUSTER_SECURITY_GROUP, efa_sg]
        assert "subnetId" not in interface  # EKS managed node groups reject it


@by_id(EFA_GROUPS)
def test_efa_group_lives_in_one_subnet_and_a_cluster_placement_group(
    runs: dict[str, StackRun], group: Group
) -> None:
    run = runs[group.stack]
    assert node_group(runs, group)["subnetIds"] == [mock_id(f"network-private-{group.zone}")]
    placement = run.one("aws:ec2/placementGroup:PlacementGroup", f"gpu-{group.name}-placement")
    assert placement.inputs["strategy"] == "cluster"
    assert launch_template(runs, group)["placement"] == {"groupName": placement.name}


@by_id(EFA_GROUPS)
def test_efa_security_group_allows_all_traffic_to_and_from_itself(
    runs: dict[str, StackRun], group: Group
) -> None:
    run, sg = runs[group.stack], mock_id(f"gpu-{group.name}-efa-sg")
    for kind, name in (
        ("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule", "ingress"),
        ("aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule", "egress"),
    ):
        rule = run.one(kind, f"gpu-{group.name}-efa-self-{name}").inputs
        assert rule["securityGroupId"] == sg
        assert rule["referencedSecurityGroupId"] == sg
        assert rule["ipProtocol"] == "-1"


@by_id([g for g in GROUPS if not g.efa])
def test_groups_without_efa_span_every_zone_with_default_networking(
    runs: dict[str, StackRun], group: Group
) -> None:
    run = runs[group.stack]
    template = launch_template(runs, group)
    assert "networkInterfaces" not in template
    assert "placement" not in template
    assert len(node_group(runs, group)["subnetIds"]) == ZONES[group.stack]
    names = {r.name for r in run.resources}
    assert f"gpu-{group.name}-efa-sg" not in names
    assert f"gpu-{group.name}-placement" not in names


def _variant(config: dict[str, Any]) -> None:
    groups = config[config_key("gpuNodeGroups")]
    groups.append(
        {
            "name": "h100-block",
            "instanceType": "p5.48xlarge",
            "capacityType": "capacityBlock",
            "capacityReservationId": "cr-0123456789abcdef0",
            "availabilityZone": "us-east-1b",
            "efa": True,
            "minSize": 0,
            "desiredSize": 0,
            "maxSize": 2,
            "diskGib": 600,
        }
    )
    groups.append(
        {"name": "spot", "instanceType": "g6e.2xlarge", "capacityType": "spot", "desiredSize": 0}
    )


@pytest.fixture(scope="module")
def capacity_run(tmp_path_factory: pytest.TempPathFactory) -> StackRun:
    path = stack_variant(tmp_path_factory.mktemp("gpu"), "dev", "capacity", _variant)
    return run_stack("capacity", path)


def test_capacity_block_goes_into_the_launch_template(capacity_run: StackRun) -> None:
    template = capacity_run.one("aws:ec2/launchTemplate:LaunchTemplate", "gpu-h100-block-lt").inputs
    assert template["instanceMarketOptions"] == {"marketType": "capacity-block"}
    assert template["capacityReservationSpecification"] == {
        "capacityReservationTarget": {"capacityReservationId": "cr-0123456789abcdef0"}
    }
    assert template["instanceType"] == "p5.48xlarge"
    group = capacity_run.one("aws:eks/nodeGroup:NodeGroup", "gpu-h100-block-ng").inputs
    assert group["capacityType"] == "CAPACITY_BLOCK"
    assert "instanceTypes" not in group  # named once, in the launch template
    assert group["subnetIds"] == [mock_id("network-private-us-east-1b")]


def test_spot_group(capacity_run: StackRun) -> None:
    group = capacity_run.one("aws:eks/nodeGroup:NodeGroup", "gpu-spot-ng").inputs
    assert group["capacityType"] == "SPOT"
    assert group["instanceTypes"] == ["g6e.2xlarge"]
    template = capacity_run.one("aws:ec2/launchTemplate:LaunchTemplate", "gpu-spot-lt").inputs
    assert "instanceMarketOptions" not in template  # EKS requests spot from the capacity type
