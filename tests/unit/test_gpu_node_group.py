"""GPU node groups per stack: EFA interfaces, placement, SG, labels, taint, autoscaler tags, user data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from components.gpu_node_group import GpuNodeGroupArgs
from components.node_group_spec import (
    build_efa_network_interfaces,
    efa_device_count,
    is_reserved_label,
)
from stacks.catalog import instance_type
from stacks.schema import GpuNodeGroupSettings
from tests.harness import MOCK_CLUSTER_SECURITY_GROUP, StackRun, mock_asg_name, run_stack
from tests.unit.platform_checks import (
    chrony_conf,
    config_key,
    decode_user_data,
    mock_id,
    node_config,
    run_chronyd_parse,
    stack_variant,
)

CA = "k8s.io/cluster-autoscaler"
TEMPLATE = f"{CA}/node-template"


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
    efa: int  # EFA interfaces (facts §A1), 0 when efa is off

    @property
    def id(self) -> str:
        return f"{self.stack}-{self.name}"


# Instance facts written from facts §A1, never read from stacks/catalog.py: g6e.xlarge 1 L40S, no
# EFA; g6e.24xlarge 4 GPUs, 2 EFA; p5.48xlarge 8 GPUs, 32 EFA.
GROUPS = [
    Group("dev", "l40s", "g6e.xlarge", None, (0, 1, 1), 150, 1, 0),
    Group("staging", "l40s", "g6e.xlarge", None, (1, 2, 3), 300, 1, 0),
    Group("staging", "l40s-efa", "g6e.24xlarge", "us-east-1a", (0, 2, 2), 400, 4, 2),
    Group("prod", "l40s", "g6e.xlarge", None, (4, 4, 8), 300, 1, 0),
    Group("prod", "h100-efa", "p5.48xlarge", "us-east-1a", (2, 2, 2), 1000, 8, 32),
]
EFA_GROUPS = [g for g in GROUPS if g.efa]
ZONES = {"dev": 2, "staging": 2, "prod": 3}
CLUSTERS = {"dev": "qwen-vl-dev", "staging": "qwen-vl-staging", "prod": "qwen-vl-prod"}


@pytest.fixture(scope="module")
def runs() -> dict[str, StackRun]:
    return {stack: run_stack(stack) for stack in ZONES}


def by_id(groups: list[Group]) -> Any:
    return pytest.mark.parametrize("group", groups, ids=[g.id for g in groups])


def node_group(runs: dict[str, StackRun], g: Group) -> dict[str, Any]:
    return runs[g.stack].one("aws:eks/nodeGroup:NodeGroup", f"gpu-{g.name}-ng").inputs


def launch_template(runs: dict[str, StackRun], g: Group) -> dict[str, Any]:
    return runs[g.stack].one("aws:ec2/launchTemplate:LaunchTemplate", f"gpu-{g.name}-lt").inputs


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
        tags[f"{TEMPLATE}/resources/hugepages-2Mi"] = "10256Mi"  # 5128 x 2 MiB (facts §A4)
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


@by_id(GROUPS)
def test_user_data_configures_kubelet_and_chrony(
    runs: dict[str, StackRun], group: Group, tmp_path: Path
) -> None:
    parts = decode_user_data(launch_template(runs, group)["userData"])
    config = node_config(parts)
    assert (config["apiVersion"], config["kind"]) == ("node.eks.aws/v1alpha1", "NodeConfig")
    # Engines drain for 45 s (shutdownTimeoutSeconds default) + 15 s margin + 15 s critical pods.
    assert config["spec"]["kubelet"]["config"]["shutdownGracePeriod"] == "75s"
    conf = chrony_conf(parts)
    result = run_chronyd_parse(conf, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "server 169.254.169.123 prefer iburst minpoll 4 maxpoll 4" in result.stdout
    # No GPU family has the ENA PTP hardware clock (facts §B).
    assert "refclock" not in result.stdout


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


# (network cards, max EFA) from facts §A1's table; one interface per card.
@pytest.mark.parametrize(
    ("kind", "interfaces", "efa", "card0"),
    [
        pytest.param("p5.48xlarge", 32, 32, "efa", id="p5.48xlarge"),
        pytest.param("p5e.48xlarge", 32, 32, "efa", id="p5e.48xlarge"),
        pytest.param("p5en.48xlarge", 16, 16, "efa", id="p5en.48xlarge"),
        pytest.param("p6-b200.48xlarge", 8, 8, "efa", id="p6-b200.48xlarge"),
        pytest.param("p4d.24xlarge", 4, 4, "efa", id="p4d.24xlarge"),
        pytest.param("g6e.48xlarge", 4, 4, "efa", id="g6e.48xlarge"),
        pytest.param("g6e.24xlarge", 2, 2, "efa", id="g6e.24xlarge"),
        pytest.param("g6.12xlarge", 1, 1, "efa", id="g6.12xlarge"),
        # 17 network cards, 16 EFA: card 0 cannot carry one (facts §A1).
        pytest.param("p6-b300.48xlarge", 17, 16, "interface", id="p6-b300.48xlarge"),
    ],
)
def test_interface_layout_per_instance_type(
    kind: str, interfaces: int, efa: int, card0: str
) -> None:
    instance = instance_type(kind)
    assert instance is not None
    layout = build_efa_network_interfaces(instance, ["sg-1"])
    assert len(layout) == interfaces
    assert efa_device_count(layout) == efa
    assert layout[0]["interface_type"] == card0


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


def _args(**group: Any) -> GpuNodeGroupArgs:
    settings = GpuNodeGroupSettings(**{"name": "g", "instance_type": "p5.48xlarge", **group})
    instance = instance_type(settings.instance_type)
    assert instance is not None
    return GpuNodeGroupArgs(
        group=settings,
        instance=instance,
        cluster_name="c",
        kubernetes_version="1.33",
        cluster_security_group_id="sg-c",
        node_role_arn="arn:aws:iam::1:role/n",
        vpc_id="vpc-1",
        subnet_ids=["subnet-a", "subnet-b"],
        user_data="",
        tags={},
    )


@pytest.mark.parametrize(
    ("group", "message"),
    [
        pytest.param({"efa": True}, "exactly one subnet", id="efa-across-subnets"),
        pytest.param(
            {"instance_type": "g6e.xlarge", "efa": True}, "g6e.xlarge has no EFA", id="no-efa"
        ),
        pytest.param({"capacity_type": "capacityBlock"}, "capacity reservation id", id="block"),
    ],
)
def test_component_refuses_args_it_cannot_build(group: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _args(**group)


@pytest.mark.parametrize(
    ("key", "reserved"),
    [
        ("kubernetes.io/role", True),
        ("node-role.kubernetes.io/worker", True),  # refused by EKS (eksctl issue #4007)
        ("k8s.io/x", True),
        ("eks.amazonaws.com/capacityType", True),
        ("notkubernetes.io/x", False),
        ("example.com/team", False),
        ("team", False),
    ],
)
def test_reserved_label_domains(key: str, reserved: bool) -> None:
    assert is_reserved_label(key) is reserved
