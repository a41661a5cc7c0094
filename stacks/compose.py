"""Wires a stack's components in dependency order and returns its outputs.

Each stage lives in its own module under stacks/ and hands the next stages what
they need (the Kubernetes provider, Secret names, Service names); components
never read config. Kubernetes resources all use the cluster's provider, so
`pulumi destroy` removes them before the cluster and node groups.
"""

from __future__ import annotations

from typing import Any

from stacks.platform import build_platform
from stacks.schema import Settings
from stacks.secrets import build_secrets


def compose(settings: Settings) -> dict[str, Any]:
    """Build every component of the stack; return the stack outputs by name."""
    outputs: dict[str, Any] = {"stack": settings.stack, "environment": settings.environment}
    secrets = build_secrets(settings)
    platform = build_platform(settings)
    # STAGE platform (issue 3): network, EKS, node groups, add-ons -> Kubernetes provider
    # STAGE engines (issue 4): vLLM LeaderWorkerSets, leader Services, engine Secret
    # STAGE data (issue 7): Redis
    # STAGE gateway (issue 5): Nginx gateway, API keys
    # STAGE webui (issue 7): Open WebUI behind the gateway
    # STAGE observability (issue 6): Prometheus, Grafana, alerts, KEDA
    return outputs
