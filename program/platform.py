"""Platform stage: the network, the EKS cluster, its node groups and add-ons, and the Kubernetes
provider every later Kubernetes resource uses.

Order matters on `pulumi destroy` as much as on `up`: every Kubernetes object goes through the
provider built here from the cluster's outputs, so Pulumi deletes them before the node groups and
the cluster they live on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import pulumi
import pulumi_kubernetes as k8s

from components.cluster_addons import ClusterAddons, ClusterAddonsArgs
from components.eks_cluster import EksCluster, EksClusterArgs
from components.gpu_node_group import GpuNodeGroup, GpuNodeGroupArgs
from components.network import Network, NetworkArgs
from components.render.eks_spec import build_kubeconfig
from components.render.node_user_data import (
    CRITICAL_PODS_GRACE_SECONDS,
    NodeUserDataArgs,
    render_node_user_data,
)
from stacks.catalog import InstanceType, instance_type, supports_phc
from stacks.schema import GpuNodeGroupSettings, Settings
from stacks.versions import KubernetesPins, kubernetes_pins

# Seconds between SIGTERM reaching a pod and its own drain timeout starting (signal delivery,
# preStop hooks); added to the longest engine drain time of a GPU group.
SHUTDOWN_MARGIN_SECONDS: Final = 15
# System nodes run the gateway, Redis and monitoring: a minute is enough to hand off.
SYSTEM_SHUTDOWN_GRACE_SECONDS: Final = 60
STACK_TAG: Final = "qwen-vl-serving/stack"


@dataclass(frozen=True)
class Platform:
    provider: k8s.Provider
    namespace: pulumi.Output[str]  # the application namespace (serving.namespace)
    cluster_name: pulumi.Output[str]
    # Workloads depend on these being ready: the node groups and the add-ons their pods need
    # (LeaderWorkerSet controller and CRD, GPU/EFA device plugins, CoreDNS).
    node_groups: tuple[pulumi.Resource, ...]
    region: str = ""
    # For IRSA roles of later stages (e.g. engines reading weights from S3).
    oidc_provider_arn: pulumi.Output[str] | None = None
    oidc_issuer_url: pulumi.Output[str] | None = None
    # For the vision cache's EFS mount targets (program/vision.py).
    vpc_id: pulumi.Output[str] | None = None
    private_subnet_ids: tuple[pulumi.Output[str], ...] = ()
    node_security_group_id: pulumi.Output[str] | None = None
    outputs: Mapping[str, Any] = field(default_factory=dict)  # stack outputs of this stage

    def opts(self, **kwargs: object) -> pulumi.ResourceOptions:
        """Options for a Kubernetes resource: always through the cluster's provider."""
        return pulumi.ResourceOptions(provider=self.provider, **kwargs)  # type: ignore[arg-type]


def stack_tags(settings: Settings) -> dict[str, str]:
    return {**settings.tags, STACK_TAG: settings.stack}


def gpu_shutdown_grace_seconds(settings: Settings, group: GpuNodeGroupSettings) -> int:
    """kubelet's shutdown grace on a GPU group: the longest engine drain there, plus margins."""
    drains = [
        d.shutdown_timeout_seconds
        for d in settings.serving.deployments
        if d.node_group == group.name
    ]
    return max(drains, default=0) + SHUTDOWN_MARGIN_SECONDS + CRITICAL_PODS_GRACE_SECONDS


def _pins(settings: Settings) -> KubernetesPins:
    pins = kubernetes_pins(settings.cluster.version)
    assert pins is not None  # stacks.rules refuses versions without pins
    return pins


def _instance(name: str) -> InstanceType:
    found = instance_type(name)
    assert found is not None  # stacks.rules refuses unknown types
    return found


def build_platform(settings: Settings) -> Platform:
    tags, region = stack_tags(settings), settings.region
    pins = _pins(settings)
    network = Network(
        "network",
        NetworkArgs(
            settings=settings.network, region=region, cluster_name=settings.cluster.name, tags=tags
        ),
    )
    system_type = _instance(settings.system_nodes.instance_type)
    cluster = EksCluster(
        "eks",
        EksClusterArgs(
            settings=settings.cluster,
            system_nodes=settings.system_nodes,
            region=region,
            subnet_ids=list(network.private_subnets.values()),
            system_user_data=render_node_user_data(
                NodeUserDataArgs(
                    phc=supports_phc(system_type, region),
                    shutdown_grace_seconds=SYSTEM_SHUTDOWN_GRACE_SECONDS,
                )
            ),
            addon_versions=pins.addons,
            tags=tags,
            protect=settings.protect,
        ),
    )
    gpu_groups = [_gpu_group(settings, g, network, cluster, tags) for g in settings.gpu_node_groups]
    kubeconfig = _kubeconfig(cluster, region)
    provider = k8s.Provider("k8s", kubeconfig=kubeconfig)
    addons = ClusterAddons(
        "addons",
        ClusterAddonsArgs(
            cluster_name=settings.cluster.name,
            region=region,
            cluster_autoscaler_image_tag=pins.cluster_autoscaler_image_tag,
            oidc=cluster.oidc,
            enable_cluster_autoscaler=settings.autoscaling.cluster_autoscaler,
            tags=tags,
            depends_on=cluster.workload_prerequisites,
        ),
        opts=pulumi.ResourceOptions(providers=[provider]),
    )
    namespace = k8s.core.v1.Namespace(
        "app-namespace",
        metadata={"name": settings.serving.namespace},
        opts=pulumi.ResourceOptions(provider=provider),
    )
    return Platform(
        provider=provider,
        namespace=namespace.metadata.name,
        cluster_name=cluster.name,
        node_groups=(
            *cluster.workload_prerequisites,
            *(g.node_group for g in gpu_groups),
            *addons.releases.values(),
        ),
        region=region,
        oidc_provider_arn=cluster.oidc_provider_arn,
        oidc_issuer_url=cluster.oidc_issuer_url,
        vpc_id=network.vpc_id,
        private_subnet_ids=tuple(network.private_subnets.values()),
        node_security_group_id=cluster.cluster_security_group_id,
        outputs={
            "cluster_name": cluster.name,
            "cluster_endpoint": cluster.endpoint,
            "kubeconfig": kubeconfig,
            "vpc_id": network.vpc_id,
            "gpu_node_groups": {
                g.name: ng.node_group.node_group_name
                for g, ng in zip(settings.gpu_node_groups, gpu_groups, strict=True)
            },
        },
    )


def _gpu_group(
    settings: Settings,
    group: GpuNodeGroupSettings,
    network: Network,
    cluster: EksCluster,
    tags: Mapping[str, str],
) -> GpuNodeGroup:
    instance = _instance(group.instance_type)
    zone = group.availability_zone
    # An AZ pins the group to that AZ's one private subnet (required for EFA placement).
    subnets = [network.private_subnets[zone]] if zone else list(network.private_subnets.values())
    user_data = render_node_user_data(
        NodeUserDataArgs(
            phc=supports_phc(instance, settings.region),
            shutdown_grace_seconds=gpu_shutdown_grace_seconds(settings, group),
        )
    )
    return GpuNodeGroup(
        f"gpu-{group.name}",
        GpuNodeGroupArgs(
            group=group,
            instance=instance,
            cluster_name=settings.cluster.name,
            kubernetes_version=cluster.kubernetes_version,
            cluster_security_group_id=cluster.cluster_security_group_id,
            node_role_arn=cluster.node_role_arn,
            vpc_id=network.vpc_id,
            subnet_ids=subnets,
            user_data=user_data,
            tags=tags,
            depends_on=cluster.node_prerequisites,
        ),
    )


def _kubeconfig(cluster: EksCluster, region: str) -> pulumi.Output[str]:
    return pulumi.Output.all(cluster.name, cluster.endpoint, cluster.certificate_authority).apply(
        lambda a: json.dumps(build_kubeconfig(a[0], a[1], a[2], region))
    )
