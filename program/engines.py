"""Engines stage: one VllmDeployment (LeaderWorkerSet + leader Service + Secret) per deployment.

Hands later stages what they address the engines by: the gateway proxies to each leader
Service, the monitors scrape it and KEDA scales each LeaderWorkerSet.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pulumi

from components.render.vllm_command import served_model_name, spec_for
from components.vllm_deployment import VllmDeployment, VllmDeploymentArgs
from program.platform import Platform
from program.secrets import StackSecrets
from stacks.naming import (
    VLLM_PORT,
    leader_service_name,
    lws_name,
    service_host,
)
from stacks.schema import Settings


@dataclass(frozen=True)
class EngineEndpoint:
    """How the rest of the stack reaches one deployment's engines."""

    deployment: str
    served_model_name: str
    lws_name: str
    leader_service: str
    leader_host: str  # DNS name of the headless leader Service
    port: int


@dataclass(frozen=True)
class Engines:
    endpoints: Mapping[str, EngineEndpoint]  # by deployment name, in settings order
    components: tuple[VllmDeployment, ...]

    def outputs(self) -> dict[str, Any]:
        """Stack output: per deployment, where its leaders answer and the model name to send."""
        return {
            name: {"leader_service_host": e.leader_host, "served_model_name": e.served_model_name}
            for name, e in self.endpoints.items()
        }


def build_engines(
    settings: Settings, platform: Platform, secrets: StackSecrets, redis: pulumi.Resource | None
) -> Engines:
    """`redis` is the Redis component: engines with kvOffloadRedis read its client Secret."""
    components: list[VllmDeployment] = []
    endpoints: dict[str, EngineEndpoint] = {}
    for d in settings.serving.deployments:
        args = VllmDeploymentArgs(
            spec=spec_for(settings, d),
            namespace=platform.namespace,
            engine_api_key=secrets.engine_api_key,
            hf_token=secrets.hf_token,
            replicas_managed_externally=settings.autoscaling.keda,
            depends_on=(*platform.node_groups, *([redis] if d.kv_offload_redis and redis else [])),
        )
        components.append(VllmDeployment(d.name, args, opts=platform.opts()))
        endpoints[d.name] = EngineEndpoint(
            deployment=d.name,
            served_model_name=served_model_name(d),
            lws_name=lws_name(d.name),
            leader_service=leader_service_name(d.name),
            leader_host=service_host(leader_service_name(d.name), settings.serving.namespace),
            port=VLLM_PORT,
        )
    return Engines(endpoints=endpoints, components=tuple(components))
