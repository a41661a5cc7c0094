"""Autoscaling: KEDA and one ScaledObject per deployment, scaling whole LeaderWorkerSet groups.

The signal is vLLM's queue depth (`vllm:num_requests_waiting`), not CPU or GPU
utilisation: a GPU engine is "busy" at any load, while waiting requests say that the
groups in service cannot keep up (docs/reference/peers.md#autoscaling-signal). KEDA's
Prometheus scaler reads the sum over the deployment's leaders; as an `AverageValue` metric the HPA divides it by the
number of groups, so a group is added when the mean backlog per group passes the
deployment's `queueDepthTarget`. An optional second trigger does the same for the mean
KV-cache usage. Scale-down waits `scaleDownStabilizationSeconds` (default 300 s) and
removes one group at a time, so groups that take minutes to load are not flapped.

GPU nodes follow the pods: a new group's pods stay Pending until Cluster Autoscaler (the
platform stage) adds nodes to the deployment's node group; the settings rules check that
maxReplicas x nodesPerGroup fits the group's maxSize.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import pulumi
import pulumi_kubernetes as k8s

from components.render.alert_rules import selector
from components.render.scrape_config import DEPLOYMENT, JOB_VLLM
from stacks.naming import (
    KEDA_NAMESPACE,
    TYPE_PREFIX,
    common_labels,
    lws_name,
    system_node_selector,
)
from stacks.schema import DeploymentSettings
from stacks.versions import KEDA, helm_chart

TYPE: Final = f"{TYPE_PREFIX}:observability:Autoscaling"
KEDA_API: Final = "keda.sh/v1alpha1"
LWS_API: Final = "leaderworkerset.x-k8s.io/v1"
LWS_KIND: Final = "LeaderWorkerSet"
QUEUE_TRIGGER: Final = "queue-depth"
KV_TRIGGER: Final = "kv-cache-usage"
ACTIVITY_TRIGGER: Final = "activity"
# Add at most one group per period while the backlog lasts: new groups need minutes to load
# and cannot drain the queue before then, so faster steps would only overshoot.
SCALE_UP_PERIOD_SECONDS: Final = 120
SCALE_DOWN_PERIOD_SECONDS: Final = 60


def _vllm(metric: str, deployment: str) -> str:
    return selector(metric, job=JOB_VLLM, **{DEPLOYMENT: deployment})


def queue_query(deployment: str) -> str:
    """Requests waiting over all leaders of the deployment (KEDA divides by the group count)."""
    return f"sum({_vllm('vllm:num_requests_waiting', deployment)})"


def kv_cache_query(deployment: str) -> str:
    """Mean KV-cache usage (0-1) over the deployment's groups."""
    return f"avg({_vllm('vllm:kv_cache_usage_perc', deployment)})"


def activity_query(deployment: str) -> str:
    """1 while any request is running or waiting, else 0 (keeps a scale-to-zero group awake)."""
    running = f"sum({_vllm('vllm:num_requests_running', deployment)})"
    return f"clamp_max({running} + {queue_query(deployment)}, 1)"


def _prometheus_trigger(
    name: str, prometheus_url: str, query: str, threshold: str, metric_type: str
) -> dict[str, Any]:
    return {
        "type": "prometheus",
        "name": name,
        "metricType": metric_type,
        "metadata": {
            "serverAddress": prometheus_url,
            "query": query,
            "threshold": threshold,
            # No series (no leader serving yet) reads as 0 rather than an error.
            "ignoreNullValues": "true",
        },
    }


def build_triggers(d: DeploymentSettings, prometheus_url: str) -> list[dict[str, Any]]:
    a = d.autoscaling
    triggers = [
        _prometheus_trigger(
            QUEUE_TRIGGER,
            prometheus_url,
            queue_query(d.name),
            str(a.queue_depth_target),
            "AverageValue",
        )
    ]
    if a.kv_cache_usage_target is not None:
        # Already a per-group mean: "Value" makes the HPA compare it like a utilisation.
        triggers.append(
            _prometheus_trigger(
                KV_TRIGGER,
                prometheus_url,
                kv_cache_query(d.name),
                f"{a.kv_cache_usage_target:g}",
                "Value",
            )
        )
    if a.scale_to_zero:
        # Queue depth alone would read 0 while every request is already running and let KEDA
        # deactivate a busy deployment; this trigger is active while anything is in flight and
        # never asks for more than one group (1 / 1), so it does not drive scale-up.
        triggers.append(
            _prometheus_trigger(
                ACTIVITY_TRIGGER, prometheus_url, activity_query(d.name), "1", "AverageValue"
            )
        )
    return triggers


def build_scaled_object(
    d: DeploymentSettings, *, namespace: str, prometheus_url: str, polling_interval_seconds: int
) -> dict[str, Any]:
    """The ScaledObject (metadata + spec) that scales one deployment's LeaderWorkerSet."""
    a = d.autoscaling
    if a.min_replicas == 0 and not a.scale_to_zero:
        raise ValueError(f"{d.name}: minReplicas 0 needs scaleToZero (see stacks/rules.py)")
    name = lws_name(d.name)
    stabilisation = a.scale_down_stabilization_seconds
    spec: dict[str, Any] = {
        # LWS implements the scale subresource: replicas counts groups, not pods.
        "scaleTargetRef": {"apiVersion": LWS_API, "kind": LWS_KIND, "name": name},
        "pollingInterval": polling_interval_seconds,
        "minReplicaCount": a.min_replicas,
        "maxReplicaCount": a.max_replicas,
        "advanced": {
            "horizontalPodAutoscalerConfig": {
                "name": f"keda-{name}",
                "behavior": {
                    "scaleUp": {
                        "stabilizationWindowSeconds": 0,
                        "policies": [
                            {"type": "Pods", "value": 1, "periodSeconds": SCALE_UP_PERIOD_SECONDS}
                        ],
                    },
                    "scaleDown": {
                        "stabilizationWindowSeconds": stabilisation,
                        "policies": [
                            {"type": "Pods", "value": 1, "periodSeconds": SCALE_DOWN_PERIOD_SECONDS}
                        ],
                    },
                },
            }
        },
        "triggers": build_triggers(d, prometheus_url),
    }
    if a.scale_to_zero:
        # The last group goes only after this long without any request in flight.
        spec["cooldownPeriod"] = stabilisation
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": common_labels("autoscaling", name),
        },
        "spec": spec,
    }


def build_keda_values() -> dict[str, Any]:
    return {"nodeSelector": system_node_selector()}


@dataclass(frozen=True, kw_only=True)
class AutoscalingArgs:
    deployments: Sequence[DeploymentSettings]
    serving_namespace: str
    prometheus_url: str
    polling_interval_seconds: int
    # What must exist first: the system nodes, Prometheus, the LeaderWorkerSets.
    depends_on: Sequence[pulumi.Resource] = ()


class Autoscaling(pulumi.ComponentResource):
    release: k8s.helm.v3.Release
    scaled_objects: Mapping[str, k8s.apiextensions.CustomResource]

    def __init__(
        self, name: str, args: AutoscalingArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(TYPE, name, None, opts)
        chart = helm_chart(KEDA)
        namespace = k8s.core.v1.Namespace(
            f"{name}-namespace",
            metadata={"name": KEDA_NAMESPACE, "labels": common_labels("autoscaling", name)},
            opts=pulumi.ResourceOptions(parent=self, depends_on=list(args.depends_on)),
        )
        self.release = k8s.helm.v3.Release(
            f"{name}-{KEDA}",
            k8s.helm.v3.ReleaseArgs(
                name=KEDA,
                chart=chart.reference,
                version=chart.version,
                repository_opts=k8s.helm.v3.RepositoryOptsArgs(repo=chart.repository),
                namespace=namespace.metadata.name,
                values=build_keda_values(),
            ),
            opts=pulumi.ResourceOptions(parent=self),
        )
        after = pulumi.ResourceOptions(parent=self, depends_on=[self.release, *args.depends_on])
        self.scaled_objects = {}
        for d in args.deployments:
            obj = build_scaled_object(
                d,
                namespace=args.serving_namespace,
                prometheus_url=args.prometheus_url,
                polling_interval_seconds=args.polling_interval_seconds,
            )
            self.scaled_objects[d.name] = k8s.apiextensions.CustomResource(
                f"{name}-scaledobject-{d.name}",
                api_version=KEDA_API,
                kind="ScaledObject",
                metadata=obj["metadata"],
                spec=obj["spec"],
                opts=after,
            )
        self.register_outputs(
            {"release": self.release.status, "scaled_objects": list(self.scaled_objects)}
        )
