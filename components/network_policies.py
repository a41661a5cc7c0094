"""NetworkPolicies: the serving namespace's default-deny and the channels it allows.

Registers what components/render/network_policies.py renders for the namespace (Redis's own
policy stays with the Redis component, built by the same renderer). Enforced only because the
vpc-cni add-on turns its network policy agent on (components/eks_cluster.py). docs/security.md
lists every channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from stacks.naming import TYPE_PREFIX

TYPE = f"{TYPE_PREFIX}:isolation:NetworkPolicies"


@dataclass(frozen=True, kw_only=True)
class NetworkPoliciesArgs:
    namespace: pulumi.Input[str]  # the namespace resource's name: policies wait for it
    policies: Sequence[dict[str, Any]]  # rendered manifests (build_namespace_policies)


class NetworkPolicies(pulumi.ComponentResource):
    names: list[str]

    def __init__(
        self, name: str, args: NetworkPoliciesArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(TYPE, name, None, opts)
        self.names = []
        for manifest in args.policies:
            meta = manifest["metadata"]
            k8s.networking.v1.NetworkPolicy(
                f"{name}-{meta['name']}",
                metadata={
                    "name": meta["name"],
                    "namespace": args.namespace,
                    "labels": meta["labels"],
                },
                spec=manifest["spec"],
                opts=pulumi.ResourceOptions(parent=self),
            )
            self.names.append(meta["name"])
        self.register_outputs({"names": self.names})
