"""One GPU node group: launch template, EKS managed node group and, with EFA, its placement and SG."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from components.eks_cluster import (
    SCALING_IGNORE_CHANGES,
    NodeLaunchSpec,
    create_node_launch_template,
)
from components.render.node_group_spec import (
    GPU_AMI_TYPE,
    NODE_TEMPLATE_PREFIX,
    build_autoscaler_tags,
    build_capacity_block_options,
    build_efa_network_interfaces,
    build_gpu_labels,
    build_gpu_taints,
    capacity_type,
    node_template_tags,
)
from stacks.catalog import InstanceType
from stacks.naming import TYPE_PREFIX
from stacks.schema import GpuNodeGroupSettings

TYPE = f"{TYPE_PREFIX}:platform:GpuNodeGroup"


@dataclass(frozen=True, kw_only=True)
class GpuNodeGroupArgs:
    group: GpuNodeGroupSettings
    instance: InstanceType  # the catalog row of group.instance_type
    cluster_name: str
    kubernetes_version: pulumi.Input[str]  # the cluster's: nodes are upgraded after it
    cluster_security_group_id: pulumi.Input[str]  # EKS adds it only when the LT names no SGs
    node_role_arn: pulumi.Input[str]
    vpc_id: pulumi.Input[str]
    # Exactly the group's subnets: one (in group.availabilityZone) for EFA groups.
    subnet_ids: Sequence[pulumi.Input[str]]
    # MIME user data (components/render/node_user_data.py), not yet base64-encoded.
    user_data: str
    tags: Mapping[str, str]
    # Created before the nodes (node role policies, CNI add-ons).
    depends_on: Sequence[pulumi.Resource] = ()

    def __post_init__(self) -> None:
        g, problems = self.group, []
        if g.efa and not self.instance.efa_supported:
            problems.append(f"{g.instance_type} has no EFA")
        if g.efa and len(self.subnet_ids) != 1:
            problems.append(f"an EFA group needs exactly one subnet, got {len(self.subnet_ids)}")
        if g.capacity_type == "capacityBlock" and not g.capacity_reservation_id:
            problems.append("capacityBlock needs a capacity reservation id")
        if problems:
            raise ValueError(f"GPU node group {g.name}: " + "; ".join(problems))


class GpuNodeGroup(pulumi.ComponentResource):
    """A scale-from-zero GPU node group, tainted for GPU pods, optionally with every EFA device."""

    labels: dict[str, str]  # Kubernetes node labels
    autoscaler_tags: dict[str, str]  # Cluster Autoscaler discovery and node-template tags
    node_group: aws.eks.NodeGroup
    launch_template: aws.ec2.LaunchTemplate
    placement_group: aws.ec2.PlacementGroup | None
    efa_security_group: aws.ec2.SecurityGroup | None

    def __init__(
        self, name: str, args: GpuNodeGroupArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(TYPE, name, None, opts)
        self._args = args
        g = args.group
        self.labels = build_gpu_labels(g.name, efa=g.efa, extra=g.labels)
        self.autoscaler_tags = build_autoscaler_tags(
            args.cluster_name, self.labels, args.instance, efa=g.efa
        )
        self.efa_security_group = self._create_efa_security_group(name) if g.efa else None
        self.placement_group = self._create_placement_group(name) if g.efa else None
        self.launch_template = self._create_launch_template(name)
        self.node_group = self._create_node_group(name)
        self._tag_autoscaling_group(name)
        self.register_outputs(
            {
                "node_group": self.node_group.id,
                "launch_template": self.launch_template.id,
                "placement_group": self.placement_group.id if self.placement_group else None,
                "efa_security_group": (
                    self.efa_security_group.id if self.efa_security_group else None
                ),
            }
        )

    def _child(self, **kwargs: Any) -> pulumi.ResourceOptions:
        return pulumi.ResourceOptions(parent=self, **kwargs)

    def _tags(self, **extra: str) -> dict[str, str]:
        return {**self._args.tags, **extra}

    def _create_efa_security_group(self, name: str) -> aws.ec2.SecurityGroup:
        """EFA needs all traffic to AND from the group itself; without the egress self rule
        OS-bypass traffic fails (the provider removes AWS's default allow-all egress). Source:
        docs/reference/aws-efa.md#efa-security-group."""
        sg = aws.ec2.SecurityGroup(
            f"{name}-efa-sg",
            vpc_id=self._args.vpc_id,
            description=f"EFA traffic between the nodes of GPU group {self._args.group.name}",
            tags=self._tags(Name=f"{self._args.cluster_name}-{self._args.group.name}-efa"),
            opts=self._child(),
        )
        aws.vpc.SecurityGroupIngressRule(
            f"{name}-efa-self-ingress",
            security_group_id=sg.id,
            referenced_security_group_id=sg.id,
            ip_protocol="-1",
            description="EFA: all traffic from the group itself",
            opts=self._child(),
        )
        aws.vpc.SecurityGroupEgressRule(
            f"{name}-efa-self-egress",
            security_group_id=sg.id,
            referenced_security_group_id=sg.id,
            ip_protocol="-1",
            description="EFA: all traffic to the group itself",
            opts=self._child(),
        )
        return sg

    def _create_placement_group(self, name: str) -> aws.ec2.PlacementGroup:
        # "cluster" packs the instances close together in one AZ: lowest latency between them.
        return aws.ec2.PlacementGroup(
            f"{name}-placement", strategy="cluster", tags=self._tags(), opts=self._child()
        )

    def _create_launch_template(self, name: str) -> aws.ec2.LaunchTemplate:
        args, g = self._args, self._args.group
        fields: dict[str, Any] = {}
        if self.efa_security_group is not None and self.placement_group is not None:
            groups = [args.cluster_security_group_id, self.efa_security_group.id]
            fields["network_interfaces"] = [
                aws.ec2.LaunchTemplateNetworkInterfaceArgs(**interface)
                for interface in build_efa_network_interfaces(args.instance, groups)
            ]
            fields["placement"] = aws.ec2.LaunchTemplatePlacementArgs(
                group_name=self.placement_group.name
            )
        if g.capacity_type == "capacityBlock":
            assert g.capacity_reservation_id is not None  # checked in GpuNodeGroupArgs
            fields |= _capacity_block_fields(g.capacity_reservation_id)
            # A capacity block names its instance type in the LT, not the node group.
            fields["instance_type"] = g.instance_type
        spec = NodeLaunchSpec(
            disk_gib=g.disk_gib, fast_disk=True, user_data=args.user_data, tags=self._tags()
        )
        return create_node_launch_template(f"{name}-lt", spec, self._child(), **fields)

    def _create_node_group(self, name: str) -> aws.eks.NodeGroup:
        args, g = self._args, self._args.group
        lt = self.launch_template
        return aws.eks.NodeGroup(
            f"{name}-ng",
            cluster_name=args.cluster_name,
            node_role_arn=args.node_role_arn,
            subnet_ids=list(args.subnet_ids),
            ami_type=GPU_AMI_TYPE,
            version=args.kubernetes_version,
            capacity_type=capacity_type(g.capacity_type),
            instance_types=None if g.capacity_type == "capacityBlock" else [g.instance_type],
            scaling_config={
                "min_size": g.min_size,
                "desired_size": g.desired_size,
                "max_size": g.max_size,
            },
            labels=self.labels,
            taints=[aws.eks.NodeGroupTaintArgs(**taint) for taint in build_gpu_taints()],
            launch_template={"id": lt.id, "version": lt.latest_version.apply(str)},
            # Replace one node at a time: a multi-node engine group loses at most one member.
            update_config={"max_unavailable": 1},
            tags=self._tags(**self.autoscaler_tags),
            opts=self._child(
                depends_on=list(args.depends_on), ignore_changes=SCALING_IGNORE_CHANGES
            ),
        )

    def _tag_autoscaling_group(self, name: str) -> None:
        """Copy the scale-from-zero tags onto the node group's Auto Scaling group, where Cluster
        Autoscaler reads them (EKS does not propagate node group tags to it)."""
        asg_name = self.node_group.resources.apply(_autoscaling_group_name)
        for key, value in node_template_tags(self.autoscaler_tags).items():
            slug = re.sub(r"[^a-z0-9]+", "-", key.removeprefix(NODE_TEMPLATE_PREFIX).lower())
            aws.autoscaling.Tag(
                f"{name}-asg-{slug.strip('-')}",
                autoscaling_group_name=asg_name,
                tag={"key": key, "value": value, "propagate_at_launch": False},
                opts=self._child(),
            )


def _capacity_block_fields(reservation_id: str) -> dict[str, Any]:
    options = build_capacity_block_options(reservation_id)
    target = options["capacity_reservation_specification"]["capacity_reservation_target"]
    return {
        "instance_market_options": aws.ec2.LaunchTemplateInstanceMarketOptionsArgs(
            **options["instance_market_options"]
        ),
        "capacity_reservation_specification": (
            aws.ec2.LaunchTemplateCapacityReservationSpecificationArgs(
                capacity_reservation_target=(
                    aws.ec2.LaunchTemplateCapacityReservationSpecificationCapacityReservationTargetArgs(
                        **target
                    )
                )
            )
        ),
    }


def _autoscaling_group_name(resources: Sequence[Any] | None) -> str:
    """The Auto Scaling group EKS created for a managed node group (one per group)."""
    groups = resources[0].autoscaling_groups if resources else None
    return (groups[0].name or "") if groups else ""
