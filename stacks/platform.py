"""Platform stage: what every Kubernetes resource of the stack runs on.

TRANSITIONAL: until the platform issue lands this builds only the Kubernetes
provider and the application namespace; the network, EKS cluster, node groups
and add-ons replace the kubeconfig placeholder below.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s

from stacks.schema import Settings


@dataclass(frozen=True)
class Platform:
    provider: k8s.Provider
    namespace: pulumi.Output[str]  # the application namespace (serving.namespace)
    cluster_name: pulumi.Output[str]
    node_groups: tuple[pulumi.Resource, ...]  # workloads depend on these being ready

    def opts(self, **kwargs: object) -> pulumi.ResourceOptions:
        """Options for a Kubernetes resource: always through the cluster's provider."""
        return pulumi.ResourceOptions(provider=self.provider, **kwargs)  # type: ignore[arg-type]


def build_platform(settings: Settings) -> Platform:
    provider = k8s.Provider("k8s", kubeconfig="{}")
    namespace = k8s.core.v1.Namespace(
        "app-namespace",
        metadata={"name": settings.serving.namespace},
        opts=pulumi.ResourceOptions(provider=provider),
    )
    return Platform(
        provider=provider,
        namespace=namespace.metadata.name,
        cluster_name=pulumi.Output.from_input(settings.cluster.name),
        node_groups=(),
    )
