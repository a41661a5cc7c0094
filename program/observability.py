"""Observability stage: Prometheus, Grafana, alerts and dashboards, then KEDA autoscaling.

The rules and dashboards are generated from the settings here (pure builders in
components/render/alert_rules.py and components/render/dashboards.py) and handed to the Monitoring
component; Autoscaling points KEDA's triggers at the Prometheus that component installs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulumi

from components.autoscaling import Autoscaling, AutoscalingArgs
from components.monitoring import (
    LeaderTarget,
    Monitoring,
    MonitoringArgs,
    StackValuesInput,
    prometheus_url,
)
from components.render.alert_rules import build_alert_rules
from components.render.dashboards import build_dashboards
from program.platform import Platform
from program.secrets import StackSecrets
from stacks.schema import Settings


@dataclass(frozen=True)
class ObservabilityOut:
    monitoring: Monitoring | None
    autoscaling: Autoscaling | None
    prometheus_url: pulumi.Output[str] | None  # in-cluster URL; None when monitoring is off
    grafana_url: pulumi.Output[str] | None

    def outputs(self) -> dict[str, pulumi.Output[str]]:
        found = {
            "prometheus_internal_url": self.prometheus_url,
            "grafana_internal_url": self.grafana_url,
        }
        return {key: value for key, value in found.items() if value is not None}


def build_observability(
    settings: Settings,
    platform: Platform,
    secrets: StackSecrets,
    workloads: Sequence[pulumi.Resource] = (),
) -> ObservabilityOut:
    """`workloads`: the LeaderWorkerSets' components, which the ScaledObjects scale."""
    if not settings.monitoring.enabled:
        # The settings rules refuse KEDA without Prometheus, so there is nothing else to build.
        return ObservabilityOut(None, None, None, None)
    m = settings.monitoring
    monitoring = Monitoring(
        "monitoring",
        MonitoringArgs(
            values=StackValuesInput(
                retention_days=m.retention_days,
                volume_gib=m.volume_gib,
                grafana_volume_gib=m.grafana_volume_gib,
                scrape_interval_seconds=m.scrape_interval_seconds,
                protect=settings.protect,
            ),
            serving_namespace=settings.serving.namespace,
            leaders=tuple(
                LeaderTarget(deployment=d.name, model=d.model) for d in settings.serving.deployments
            ),
            redis=settings.redis.enabled,
            alert_rules=build_alert_rules(settings),
            dashboards=build_dashboards(settings),
            grafana_admin_password=secrets.grafana_admin_password,
            depends_on=platform.node_groups,
        ),
        opts=platform.opts(),
    )
    autoscaling = None
    if settings.autoscaling.keda:
        autoscaling = Autoscaling(
            "autoscaling",
            AutoscalingArgs(
                deployments=settings.serving.deployments,
                serving_namespace=settings.serving.namespace,
                prometheus_url=prometheus_url(),
                polling_interval_seconds=settings.autoscaling.polling_interval_seconds,
                depends_on=[monitoring, *platform.node_groups, *workloads],
            ),
            opts=platform.opts(),
        )
    return ObservabilityOut(
        monitoring, autoscaling, monitoring.prometheus_url, monitoring.grafana_url
    )
