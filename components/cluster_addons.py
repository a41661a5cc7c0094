"""Cluster add-ons as pinned Helm releases: GPU and EFA device plugins, DCGM exporter, the
LeaderWorkerSet controller and Cluster Autoscaler (with its IRSA role).

Chart versions come from stacks/versions.py; the values are plain data from the pure
`build_*_values` functions below, so tests assert on exactly what Helm receives. Create the
component with the cluster's Kubernetes provider (`providers=[provider]`): every release inherits it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s

from components.eks_cluster import OidcIssuer, ServiceAccount, create_irsa_role
from components.render.eks_spec import build_cluster_autoscaler_policy
from stacks.naming import (
    DCGM_EXPORTER_NAME,
    DCGM_EXPORTER_NAMESPACE,
    DCGM_EXPORTER_PORT,
    EFA_LABEL,
    GPU_ROLE,
    GPU_TAINT_EFFECT,
    GPU_TAINT_KEY,
    LWS_NAMESPACE,
    NODE_ROLE_LABEL,
    SYSTEM_NAMESPACE,
    TYPE_PREFIX,
    gpu_node_selector,
    system_node_selector,
)
from stacks.versions import (
    CLUSTER_AUTOSCALER,
    DCGM_EXPORTER,
    EFA_DEVICE_PLUGIN,
    LEADER_WORKER_SET,
    NVIDIA_DEVICE_PLUGIN,
    helm_chart,
)

TYPE = f"{TYPE_PREFIX}:platform:ClusterAddons"
CLUSTER_AUTOSCALER_SERVICE_ACCOUNT: Final = "cluster-autoscaler"
IRSA_ROLE_ANNOTATION: Final = "eks.amazonaws.com/role-arn"

GPU_TOLERATION: Final[Mapping[str, str]] = {
    "key": GPU_TAINT_KEY,
    "operator": "Exists",
    "effect": GPU_TAINT_EFFECT,
}
CRITICAL_ADDONS_TOLERATION: Final[Mapping[str, str]] = {
    "key": "CriticalAddonsOnly",
    "operator": "Exists",
}
# Helm release names that differ from the chart key.
RELEASE_NAMES: Final[Mapping[str, str]] = {DCGM_EXPORTER: DCGM_EXPORTER_NAME}
SYSTEM_NODES: Final[Mapping[str, str]] = system_node_selector()
GPU_NODES: Final[Mapping[str, str]] = gpu_node_selector()


def _required_node_label(key: str, value: str) -> dict[str, Any]:
    term = {"matchExpressions": [{"key": key, "operator": "In", "values": [value]}]}
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
        }
    }


def build_nvidia_device_plugin_values() -> dict[str, Any]:
    """The chart's default affinity wants labels from Node Feature Discovery, which EKS AMIs do
    not set; our GPU role label replaces it. The toleration lets it onto tainted GPU nodes."""
    return {
        "affinity": _required_node_label(NODE_ROLE_LABEL, GPU_ROLE),
        "tolerations": [dict(GPU_TOLERATION), dict(CRITICAL_ADDONS_TOLERATION)],
    }


def build_efa_device_plugin_values() -> dict[str, Any]:
    """The chart's DaemonSet tolerates only CriticalAddonsOnly (its template writes that one
    itself), so without the GPU toleration it never runs on GPU nodes and pods asking for
    vpc.amazonaws.com/efa stay Pending. Our EFA label picks the nodes.

    The chart also requires the node's instance type to be in `supportedInstanceLabels`; its
    default list at the pinned version already has every EFA type of the catalog (p4d, p4de,
    p5, p5e, p5en, p6 and the g5/g6/g6e sizes with EFA), so it is left alone: the rendered
    DaemonSet is checked against the catalog in tests/artifacts/test_helm_releases.py.
    Chart facts: docs/reference/aws-efa.md#efa-device-plugin.
    """
    return {
        "nodeSelector": {EFA_LABEL: "true"},
        "tolerations": [dict(GPU_TOLERATION)],
    }


def build_dcgm_exporter_values() -> dict[str, Any]:
    """GPU metrics on GPU nodes only. The ServiceMonitor is left to the monitoring stage (its
    CRD arrives with kube-prometheus-stack; a chart-made one would fail before that)."""
    return {
        "nodeSelector": dict(GPU_NODES),
        "tolerations": [dict(GPU_TOLERATION)],
        "service": {"port": DCGM_EXPORTER_PORT},
        "serviceMonitor": {"enabled": False},
    }


def build_lws_values() -> dict[str, Any]:
    return {"nodeSelector": dict(SYSTEM_NODES)}


def build_cluster_autoscaler_values(
    *, cluster_name: str, region: str, role_arn: str, image_tag: str
) -> dict[str, Any]:
    """Auto-discovers the node groups tagged for this cluster (EKS tags managed node groups'
    Auto Scaling groups with k8s.io/cluster-autoscaler/enabled and /<cluster>)."""
    return {
        "cloudProvider": "aws",
        "awsRegion": region,
        "autoDiscovery": {"clusterName": cluster_name},
        "image": {"tag": image_tag},
        "rbac": {
            "serviceAccount": {
                "create": True,
                "name": CLUSTER_AUTOSCALER_SERVICE_ACCOUNT,
                "annotations": {IRSA_ROLE_ANNOTATION: role_arn},
            }
        },
        "extraArgs": {
            # Pick the group that wastes the least CPU/memory for the pending pods.
            "expander": "least-waste",
            # vLLM pods mount an in-memory emptyDir at /dev/shm; with the default (true) no GPU
            # node running an engine would ever be scaled down.
            "skip-nodes-with-local-storage": False,
            "balance-similar-node-groups": True,
        },
        "nodeSelector": dict(SYSTEM_NODES),
        "priorityClassName": "system-cluster-critical",
    }


@dataclass(frozen=True, kw_only=True)
class ClusterAddonsArgs:
    cluster_name: str
    region: str
    # The Cluster Autoscaler image tag matching the cluster's Kubernetes minor (versions.py).
    cluster_autoscaler_image_tag: str
    oidc: OidcIssuer
    enable_cluster_autoscaler: bool
    tags: Mapping[str, str]
    # Nodes the controllers run on (the system node group) and the cluster's DNS.
    depends_on: Sequence[pulumi.Resource] = ()


class ClusterAddons(pulumi.ComponentResource):
    """The Helm releases every stack needs before its workloads."""

    releases: dict[str, k8s.helm.v3.Release]

    def __init__(
        self, name: str, args: ClusterAddonsArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(TYPE, name, None, opts)
        self._args = args
        self.releases = {
            NVIDIA_DEVICE_PLUGIN: self._release(
                name, NVIDIA_DEVICE_PLUGIN, SYSTEM_NAMESPACE, build_nvidia_device_plugin_values()
            ),
            EFA_DEVICE_PLUGIN: self._release(
                name, EFA_DEVICE_PLUGIN, SYSTEM_NAMESPACE, build_efa_device_plugin_values()
            ),
            DCGM_EXPORTER: self._release(
                name, DCGM_EXPORTER, DCGM_EXPORTER_NAMESPACE, build_dcgm_exporter_values()
            ),
            LEADER_WORKER_SET: self._release(
                name, LEADER_WORKER_SET, LWS_NAMESPACE, build_lws_values()
            ),
        }
        if args.enable_cluster_autoscaler:
            self.releases[CLUSTER_AUTOSCALER] = self._create_cluster_autoscaler(name)
        self.register_outputs({key: r.status for key, r in self.releases.items()})

    def _child(self, **kwargs: Any) -> pulumi.ResourceOptions:
        return pulumi.ResourceOptions(parent=self, **kwargs)

    def _release(
        self,
        name: str,
        key: str,
        namespace: str,
        values: pulumi.Input[Mapping[str, Any]],
    ) -> k8s.helm.v3.Release:
        chart = helm_chart(key)
        repo = k8s.helm.v3.RepositoryOptsArgs(repo=chart.repository) if chart.repository else None
        return k8s.helm.v3.Release(
            f"{name}-{key}",
            k8s.helm.v3.ReleaseArgs(
                # A fixed release name keeps object names stable (the DCGM Service is found by it).
                name=RELEASE_NAMES.get(key, key),
                chart=chart.reference,
                version=chart.version,
                repository_opts=repo,
                namespace=namespace,
                # kube-system always exists; the others belong to their release.
                create_namespace=namespace != SYSTEM_NAMESPACE,
                values=values,
            ),
            opts=self._child(depends_on=list(self._args.depends_on)),
        )

    def _create_cluster_autoscaler(self, name: str) -> k8s.helm.v3.Release:
        args = self._args
        role = create_irsa_role(
            f"{name}-cluster-autoscaler-role",
            args.oidc,
            ServiceAccount(SYSTEM_NAMESPACE, CLUSTER_AUTOSCALER_SERVICE_ACCOUNT),
            args.tags,
            self._child(),
        )
        aws.iam.RolePolicy(
            f"{name}-cluster-autoscaler-policy",
            role=role.id,
            policy=json.dumps(build_cluster_autoscaler_policy(args.cluster_name)),
            opts=self._child(),
        )
        values = role.arn.apply(
            lambda arn: build_cluster_autoscaler_values(
                cluster_name=args.cluster_name,
                region=args.region,
                role_arn=arn,
                image_tag=args.cluster_autoscaler_image_tag,
            )
        )
        return self._release(name, CLUSTER_AUTOSCALER, SYSTEM_NAMESPACE, values)
