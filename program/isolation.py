"""Isolation stage: the serving namespace's NetworkPolicies (default-deny plus one policy per
channel), rendered from the same settings that place the pods. docs/security.md."""

from __future__ import annotations

from components.network_policies import NetworkPolicies, NetworkPoliciesArgs
from components.render.network_policies import build_namespace_policies
from program.platform import Platform
from stacks.schema import Settings


def build_isolation(settings: Settings, platform: Platform) -> NetworkPolicies:
    return NetworkPolicies(
        "isolation",
        NetworkPoliciesArgs(
            namespace=platform.namespace, policies=build_namespace_policies(settings)
        ),
        opts=platform.opts(),
    )
