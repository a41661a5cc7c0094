"""Vision stage: the shared vision cache and one encoder tier per disaggregated deployment.

Runs after the engines (encoders use each deployment's engine Secret; engines mount the cache
claim and connector this stage creates, and simply wait in ContainerCreating until they exist)
and after observability (the encoders' PodMonitor and ScaledObject need its CRDs). Nothing is
created for a stack without `vision.mode: disaggregated` (docs/vision.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pulumi

from components.eks_cluster import OidcIssuer
from components.monitoring import prometheus_url
from components.render.vision_flags import disaggregated
from components.render.vllm_command import EngineSpec, engine_spec, spec_for
from components.vision_tier import (
    EncoderObservability,
    EncoderTier,
    EncoderTierArgs,
    VisionCache,
    VisionCacheArgs,
)
from program.observability import ObservabilityOut
from program.platform import Platform, stack_tags
from stacks.naming import MONITORING_NAMESPACE, engine_secret_name
from stacks.planner import plan_for
from stacks.rules.vision import encoder_node_group
from stacks.schema import DeploymentSettings, Settings


def build_vision(
    settings: Settings,
    platform: Platform,
    observability: ObservabilityOut,
    engines: Sequence[pulumi.Resource],
) -> tuple[EncoderTier, ...]:
    deployments = [d for d in settings.serving.deployments if disaggregated(d)]
    if not deployments:
        return ()
    cache = _cache(settings, platform, deployments)
    return tuple(
        EncoderTier(
            f"{d.name}-encoder",
            EncoderTierArgs(
                spec=spec_for(settings, d),
                encoder_spec=_encoder_spec(settings, d),
                namespace=settings.serving.namespace,
                observability=_observability(settings, observability),
                depends_on=(cache.claim, cache.connector, *engines, *platform.node_groups),
            ),
            opts=platform.opts(),
        )
        for d in deployments
    )


def _cache(
    settings: Settings, platform: Platform, deployments: Sequence[DeploymentSettings]
) -> VisionCache:
    assert platform.oidc_provider_arn is not None
    assert platform.oidc_issuer_url is not None
    assert platform.vpc_id is not None
    assert platform.node_security_group_id is not None
    return VisionCache(
        "vision-cache",
        VisionCacheArgs(
            region=settings.region,
            cluster_name=platform.cluster_name,
            vpc_id=platform.vpc_id,
            subnet_ids=platform.private_subnet_ids,
            node_security_group_id=platform.node_security_group_id,
            oidc=OidcIssuer(platform.oidc_provider_arn, platform.oidc_issuer_url),
            namespace=platform.namespace,
            # one file system for the stack: the throughput mode every tier agrees on
            # (stacks/rules/vision.py), the sum of the bounds (each deployment's expiry job
            # keeps its own directory under its bound)
            throughput_mode=deployments[0].vision.cache.throughput_mode,
            max_size_gib=sum(d.vision.cache.max_size_gib for d in deployments),
            tags=stack_tags(settings),
            provider=platform.provider,
            protect=settings.protect,
            depends_on=platform.node_groups,
        ),
    )


def _encoder_spec(settings: Settings, d: DeploymentSettings) -> EngineSpec:
    """The deployment as seen on its encoder node group (instance, labels, taints)."""
    plan = plan_for(settings, d)
    assert plan is not None  # validated settings
    on_group = dataclasses.replace(d, node_group=encoder_node_group(d))
    return engine_spec(settings, on_group, plan, engine_secret_name(d.name))


def _observability(settings: Settings, o: ObservabilityOut) -> EncoderObservability | None:
    if o.monitoring is None:
        return None
    return EncoderObservability(
        monitoring_namespace=MONITORING_NAMESPACE,
        scrape_interval=f"{settings.monitoring.scrape_interval_seconds}s",
        monitoring=o.monitoring,
        keda=o.autoscaling.release if o.autoscaling is not None else None,
        prometheus_url=prometheus_url(),
        polling_interval_seconds=settings.autoscaling.polling_interval_seconds,
    )
