"""Rules of autoscaling and observability: KEDA bounds, alert thresholds, retention."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from stacks.parse import Problem, camel
from stacks.rules.common import deployment_path, positive
from stacks.schema import Settings


def autoscaling_rules(s: Settings) -> Iterator[Problem]:
    demand: Counter[str] = Counter()
    for d in s.serving.deployments:
        path = f"{deployment_path(s, d)}.autoscaling"
        a = d.autoscaling
        if a.max_replicas < a.min_replicas:
            yield Problem(
                f"{path}.maxReplicas",
                f"must be at least minReplicas={a.min_replicas}",
                a.max_replicas,
            )
        if a.min_replicas == 0 and not a.scale_to_zero:
            yield Problem(
                f"{path}.minReplicas",
                "0 needs scaleToZero: true (cold starts take minutes); or use 1",
                0,
            )
        if not a.min_replicas <= d.replicas <= max(a.max_replicas, a.min_replicas):
            yield Problem(
                f"{deployment_path(s, d)}.replicas",
                "must lie between "
                f"autoscaling.minReplicas={a.min_replicas} and maxReplicas={a.max_replicas}",
                d.replicas,
            )
        demand[d.node_group] += a.max_replicas * d.nodes_per_group
    for i, g in enumerate(s.gpu_node_groups):
        if demand[g.name] > g.max_size:
            users = [d.name for d in s.serving.deployments if d.node_group == g.name]
            yield Problem(
                f"gpuNodeGroups[{i}].maxSize",
                f"deployments {', '.join(users)} may need "
                f"{demand[g.name]} nodes (maxReplicas x nodesPerGroup); raise maxSize "
                "or lower their maxReplicas",
                g.max_size,
            )


# HPA limits (autoscaling/v2 HPAScalingRules): stabilizationWindowSeconds in [0, 3600].
_MAX_STABILIZATION_SECONDS = 3600


def observability_rules(s: Settings) -> Iterator[Problem]:
    """Alert thresholds, Prometheus storage and per-deployment KEDA settings."""
    m = s.monitoring
    if s.autoscaling.keda and not m.enabled:
        yield Problem(
            "autoscaling.keda",
            "KEDA's triggers query Prometheus: set "
            "monitoring.enabled: true, or autoscaling.keda: false",
            True,
        )
    for field in ("retention_days", "volume_gib", "grafana_volume_gib", "scrape_interval_seconds"):
        yield from positive(f"monitoring.{camel(field)}", getattr(m, field))
    yield from _alert_threshold_problems(s)
    for d in s.serving.deployments:
        path = f"{deployment_path(s, d)}.autoscaling"
        a = d.autoscaling
        yield from positive(f"{path}.queueDepthTarget", a.queue_depth_target)
        if a.kv_cache_usage_target is not None and not 0 < a.kv_cache_usage_target <= 1:
            yield Problem(
                f"{path}.kvCacheUsageTarget",
                "must be a fraction in (0, 1], e.g. 0.8 (vllm:kv_cache_usage_perc is 0-1)",
                a.kv_cache_usage_target,
            )
        if not 0 <= a.scale_down_stabilization_seconds <= _MAX_STABILIZATION_SECONDS:
            yield Problem(
                f"{path}.scaleDownStabilizationSeconds",
                f"must be between 0 and {_MAX_STABILIZATION_SECONDS} (the HPA's limit)",
                a.scale_down_stabilization_seconds,
            )
        if a.min_replicas < 0:
            yield Problem(f"{path}.minReplicas", "must be 0 or more", a.min_replicas)
    yield from positive(
        "autoscaling.pollingIntervalSeconds", s.autoscaling.polling_interval_seconds
    )


_FRACTIONS = (
    "kv_cache_usage",
    "gateway_5xx_ratio",
    "redis_memory_ratio",
    "vision_local_fallback_ratio",
)


_POSITIVE = (
    "queue_backlog",
    "queue_backlog_minutes",
    "kv_cache_minutes",
    "ttft_p95_seconds",
    "clock_offset_seconds",
)


def _alert_threshold_problems(s: Settings) -> Iterator[Problem]:
    a = s.monitoring.alerts
    for field in _FRACTIONS:
        value = getattr(a, field)
        if not 0 < value <= 1:
            yield Problem(
                f"monitoring.alerts.{camel(field)}", "must be a fraction in (0, 1], e.g. 0.9", value
            )
    for field in _POSITIVE:
        yield from positive(f"monitoring.alerts.{camel(field)}", getattr(a, field))
    if a.worker_restarts_per_hour < 0:
        yield Problem(
            "monitoring.alerts.workerRestartsPerHour",
            "must be 0 or more",
            a.worker_restarts_per_hour,
        )
