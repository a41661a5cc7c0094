"""GPU node groups per stack: EFA interfaces, placement, SG, labels, taint, autoscaler tags, user data."""

from __future__ import annotations

from typing import Any

import pytest

from components.gpu_node_group import GpuNodeGroupArgs
from components.render.node_group_spec import build_efa_network_interfaces, efa_device_count
from stacks.catalog import instance_type
from stacks.naming import is_reserved_label
from stacks.schema import GpuNodeGroupSettings


# (network cards, max EFA) from the table in docs/reference/aws-efa.md#efa-instance-types; one interface per card.
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
        # 17 network cards, 16 EFA: card 0 cannot carry one (docs/reference/aws-efa.md#efa-instance-types).
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
