"""What an EKS managed node group looks like, as plain data: labels, taints, autoscaler tags, EFA.

Pure (no Pulumi): components/gpu_node_group.py and components/eks_cluster.py pass these values to
the launch templates and node groups, and the tests assert on them directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from stacks.catalog import InstanceType
from stacks.naming import (
    EFA_LABEL,
    EFA_RESOURCE,
    GPU_RESOURCE,
    GPU_ROLE,
    GPU_TAINT_EFFECT,
    GPU_TAINT_KEY,
    GPU_TAINT_VALUE,
    HUGEPAGES_RESOURCE,
    INSTANCE_TYPE_LABEL,
    NODE_GROUP_LABEL,
    NODE_ROLE_LABEL,
    system_node_selector,
)

# EKS-optimized Amazon Linux 2023 AMIs; EKS picks the release matching the cluster version.
GPU_AMI_TYPE: Final = "AL2023_x86_64_NVIDIA"
CPU_AMI_TYPE: Final = "AL2023_x86_64_STANDARD"
ROOT_DEVICE: Final = "/dev/xvda"

CAPACITY_TYPES: Final[Mapping[str, str]] = {
    "onDemand": "ON_DEMAND",
    "spot": "SPOT",
    "capacityBlock": "CAPACITY_BLOCK",
}
# Kubernetes taint effects as the EKS node group API spells them.
EKS_TAINT_EFFECTS: Final[Mapping[str, str]] = {
    "NoSchedule": "NO_SCHEDULE",
    "NoExecute": "NO_EXECUTE",
    "PreferNoSchedule": "PREFER_NO_SCHEDULE",
}

AUTOSCALER_PREFIX: Final = "k8s.io/cluster-autoscaler"
NODE_TEMPLATE_PREFIX: Final = f"{AUTOSCALER_PREFIX}/node-template/"
# The EFA driver pre-allocates 5128 huge pages of 2 MiB (docs/reference/aws-efa.md#hugepages).
EFA_HUGEPAGES: Final = f"{5128 * 2}Mi"

# gp3 root volumes of GPU nodes read the cached weights at load time: 1000 MiB/s (gp3's maximum;
# it needs at least 4000 IOPS) instead of the 125 MiB/s baseline, which would take an hour for
# the 471 GB of Qwen3-VL-235B.
GPU_ROOT_THROUGHPUT_MIBPS: Final = 1000
GPU_ROOT_IOPS: Final = 4000
# IMDSv2 only; 2 hops so containers that are not on the host network can still reach it.
METADATA_OPTIONS: Final[Mapping[str, Any]] = {
    "http_endpoint": "enabled",
    "http_tokens": "required",
    "http_put_response_hop_limit": 2,
}


def capacity_type(setting: str) -> str:
    """The EKS capacity type of a settings value (onDemand, spot, capacityBlock)."""
    return CAPACITY_TYPES[setting]


def build_gpu_labels(group: str, *, efa: bool, extra: Mapping[str, str]) -> dict[str, str]:
    """Node labels of a GPU group. The instance type label is kubelet's (the EKS API refuses it)."""
    return {
        **extra,
        NODE_GROUP_LABEL: group,
        NODE_ROLE_LABEL: GPU_ROLE,
        EFA_LABEL: "true" if efa else "false",
    }


def build_system_labels() -> dict[str, str]:
    return system_node_selector()


def build_gpu_taints() -> list[dict[str, str]]:
    """The taint every GPU node carries, in the EKS API's spelling."""
    return [
        {
            "key": GPU_TAINT_KEY,
            "value": GPU_TAINT_VALUE,
            "effect": EKS_TAINT_EFFECTS[GPU_TAINT_EFFECT],
        }
    ]


def build_autoscaler_tags(
    cluster_name: str, labels: Mapping[str, str], instance: InstanceType, *, efa: bool
) -> dict[str, str]:
    """Cluster Autoscaler auto-discovery and scale-from-zero tags of a GPU group.

    With no node running, the autoscaler learns a group's labels, taints and extended resources
    only from these `node-template` tags, so a pending pod that asks for nvidia.com/gpu and
    vpc.amazonaws.com/efa can still trigger a scale-up from zero.
    """
    node_labels = {**labels, INSTANCE_TYPE_LABEL: instance.name}
    resources = {GPU_RESOURCE: str(instance.gpus)}
    if efa:
        resources |= {EFA_RESOURCE: str(instance.efa_interfaces), HUGEPAGES_RESOURCE: EFA_HUGEPAGES}
    return {
        f"{AUTOSCALER_PREFIX}/enabled": "true",
        f"{AUTOSCALER_PREFIX}/{cluster_name}": "owned",
        **{f"{NODE_TEMPLATE_PREFIX}label/{k}": v for k, v in node_labels.items()},
        f"{NODE_TEMPLATE_PREFIX}taint/{GPU_TAINT_KEY}": f"{GPU_TAINT_VALUE}:{GPU_TAINT_EFFECT}",
        **{f"{NODE_TEMPLATE_PREFIX}resources/{k}": v for k, v in resources.items()},
    }


def node_template_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """The tags that must also sit on the Auto Scaling group: EKS does not copy node group tags
    there, while it does add the `enabled` and `<cluster>: owned` discovery tags itself."""
    return {k: v for k, v in tags.items() if k.startswith(NODE_TEMPLATE_PREFIX)}


def build_efa_network_interfaces(
    instance: InstanceType, security_group_ids: Sequence[Any]
) -> list[dict[str, Any]]:
    """One interface per network card, every EFA the type has.

    Interface rules and sources: docs/reference/aws-efa.md#efa-interfaces.

    Layout (the one pulumi-eks `enableEfaSupport` and terraform-aws-eks `enable_efa_support`
    create for EKS managed node groups, and the earlier AWS guidance for P5):
    - card 0, device index 0: the primary interface, type `efa` (EFA with ENA): it carries the
      node's IP address and one EFA device. When the type has more cards than EFA devices
      (p6-b300: 17 and 16), card 0 cannot carry EFA and is a plain ENA `interface`.
    - cards 1..N-1, device index 1: `efa-only`, no IP address (SRD runs over MAC addresses), so 31
      extra ENIs on a p5.48xlarge use no subnet addresses and add no routes. Needs VPC CNI >= 1.18.5.
    AWS's newest page instead adds an ENA primary plus an efa-only interface on card 0 and uses
    device index 0 on the other cards; both layouts give the same EFA count, this one keeps one
    interface per card. No public IP anywhere: EC2 allows one only with a single interface.
    Security groups go on every interface (never also on the instance), the cluster's included.
    """
    efa_on_card0 = instance.efa_interfaces >= instance.network_cards
    interfaces: list[dict[str, Any]] = []
    for card in range(instance.network_cards):
        primary = card == 0
        interface: dict[str, Any] = {
            "network_card_index": card,
            "device_index": 0 if primary else 1,
            "interface_type": ("efa" if efa_on_card0 else "interface") if primary else "efa-only",
            "delete_on_termination": "true",
            "security_groups": list(security_group_ids),
        }
        if primary:
            interface["associate_public_ip_address"] = "false"
        interfaces.append(interface)
    return interfaces


def efa_device_count(interfaces: Sequence[Mapping[str, Any]]) -> int:
    return sum(1 for i in interfaces if i["interface_type"] in ("efa", "efa-only"))


def build_root_volume(disk_gib: int, *, fast: bool) -> dict[str, Any]:
    """The gp3 root volume (the AL2023 AMIs boot from /dev/xvda); `fast` for GPU nodes."""
    ebs: dict[str, Any] = {
        "volume_size": disk_gib,
        "volume_type": "gp3",
        "encrypted": "true",
        "delete_on_termination": "true",
    }
    if fast:
        ebs |= {"throughput": GPU_ROOT_THROUGHPUT_MIBPS, "iops": GPU_ROOT_IOPS}
    return {"device_name": ROOT_DEVICE, "ebs": ebs}


def build_capacity_block_options(reservation_id: str) -> dict[str, Any]:
    """Launch template fields that point a node group at an EC2 Capacity Block for ML (EKS:
    "Create a managed node group with Capacity Blocks for ML")."""
    return {
        "instance_market_options": {"market_type": "capacity-block"},
        "capacity_reservation_specification": {
            "capacity_reservation_target": {"capacity_reservation_id": reservation_id}
        },
    }
