"""Autoscaling under Pulumi mocks, per stack: the pinned KEDA release and one ScaledObject per deployment that scales its LeaderWorkerSet on the queue-depth metric, with the configured threshold, bounds and scale-down stabilisation.

This module: the Pulumi program under mocks. The other layers' tests of the same code:
tests/artifacts/test_autoscaling.py, tests/unit/test_autoscaling.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from stacks.settings import ROOT
from tests.support.autoscaling import PROMETHEUS
from tests.support.harness import StackRun, run_stack

STACKS = ["dev", "staging", "prod"]


SCALED_OBJECT = "kubernetes:keda.sh/v1alpha1:ScaledObject"


LWS = "kubernetes:leaderworkerset.x-k8s.io/v1:LeaderWorkerSet"


# Hand-written from the stack files: deployment -> (minReplicaCount, maxReplicaCount).
BOUNDS = {
    "dev": {"qwen3-vl-2b": (1, 1)},
    "staging": {"qwen3-vl-2b": (1, 3), "qwen3-vl-32b": (1, 1)},
    "prod": {"qwen3-vl-2b": (4, 8), "qwen3-vl-235b": (1, 1)},
}


@pytest.fixture(scope="module", params=STACKS)
def run(request: pytest.FixtureRequest) -> StackRun:
    return run_stack(request.param)


def scaled_objects(run: StackRun) -> dict[str, dict[str, Any]]:
    """The engines' ScaledObjects (the vision tier's encoders have their own, scaling a Deployment)."""
    return {
        r.inputs["metadata"]["name"]: r.inputs
        for r in run.of_type(SCALED_OBJECT)
        if r.inputs["spec"]["scaleTargetRef"]["kind"] == "LeaderWorkerSet"
    }


def test_keda_release_is_pinned_on_the_system_nodes(run: StackRun) -> None:
    keda = run.one("kubernetes:helm.sh/v3:Release", "autoscaling-keda").inputs
    assert (keda["chart"], keda["version"], keda["namespace"]) == ("keda", "2.20.2", "keda")
    assert keda["repositoryOpts"]["repo"] == "https://kedacore.github.io/charts"
    assert keda["values"]["nodeSelector"] == {"qwen-vl-serving/role": "system"}


def test_one_scaled_object_per_deployment_targets_its_leaderworkerset(run: StackRun) -> None:
    objects = scaled_objects(run)
    assert set(objects) == set(BOUNDS[run.stack])
    lws = {r.inputs["metadata"]["name"]: r for r in run.of_type(LWS)}
    for name, obj in objects.items():
        ref = obj["spec"]["scaleTargetRef"]
        assert ref == {
            "apiVersion": "leaderworkerset.x-k8s.io/v1",
            "kind": "LeaderWorkerSet",
            "name": name,
        }
        target = lws[ref["name"]]
        assert target.inputs["apiVersion"] == ref["apiVersion"]
        assert target.inputs["metadata"]["namespace"] == obj["metadata"]["namespace"] == "qwen-vl"
        # KEDA owns the group count: Pulumi must not reset it on the next `up`
        assert "spec.replicas" in target.ignore_changes
        assert target.urn in run.one(SCALED_OBJECT, f"autoscaling-scaledobject-{name}").dependencies


def test_queue_depth_trigger_threshold_and_bounds(run: StackRun) -> None:
    for name, obj in scaled_objects(run).items():
        spec = obj["spec"]
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == BOUNDS[run.stack][name]
        (trigger,) = spec["triggers"]  # no KV target and no scale-to-zero in these stacks
        assert trigger["type"] == "prometheus"
        assert trigger["metricType"] == "AverageValue"  # the HPA divides the sum by the groups
        assert trigger["metadata"] == {
            "serverAddress": PROMETHEUS,
            "query": f'sum(vllm:num_requests_waiting{{job="vllm",deployment="{name}"}})',
            "threshold": "5",
            "ignoreNullValues": "true",
        }
        assert "cooldownPeriod" not in spec
        assert spec["pollingInterval"] == 15


def test_scale_down_waits_and_removes_one_group_at_a_time(run: StackRun) -> None:
    for obj in scaled_objects(run).values():
        behavior = obj["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300
        assert behavior["scaleDown"]["policies"] == [
            {"type": "Pods", "value": 1, "periodSeconds": 60}
        ]
        assert behavior["scaleUp"]["policies"] == [
            {"type": "Pods", "value": 1, "periodSeconds": 120}
        ]


def test_the_query_matches_the_labels_the_leader_monitor_adds(run: StackRun) -> None:
    monitors = {
        r.inputs["metadata"]["name"]: r.inputs["spec"]["podMetricsEndpoints"][0]["relabelings"]
        for r in run.of_type("kubernetes:monitoring.coreos.com/v1:PodMonitor")
    }
    for name in scaled_objects(run):
        relabelings = monitors[f"vllm-{name}"]
        assert {"action": "replace", "targetLabel": "job", "replacement": "vllm"} in relabelings
        assert {
            "action": "replace",
            "targetLabel": "deployment",
            "replacement": name,
        } in relabelings


@pytest.fixture(scope="module")
def elastic(tmp_path_factory: pytest.TempPathFactory) -> StackRun:
    """dev with scale-to-zero, a KV-cache trigger and a longer stabilisation."""
    document = yaml.safe_load((ROOT / "Pulumi.dev.yaml").read_text())
    config = copy.deepcopy(document)
    deployment = config["config"]["qwen-vl-serving:serving"]["deployments"][0]
    deployment["autoscaling"] = {
        "minReplicas": 0, "maxReplicas": 1, "scaleToZero": True, "kvCacheUsageTarget": 0.8,
        "scaleDownStabilizationSeconds": 600, "queueDepthTarget": 3,
    }  # fmt: skip
    path = tmp_path_factory.mktemp("elastic") / "Pulumi.dev.yaml"
    path.write_text(yaml.safe_dump(config))
    return run_stack("dev", path)


def test_scale_to_zero_and_kv_trigger_when_the_settings_ask(elastic: StackRun) -> None:
    (obj,) = scaled_objects(elastic).values()
    spec = obj["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 1)
    assert spec["cooldownPeriod"] == 600
    assert (
        spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
            "stabilizationWindowSeconds"
        ]
        == 600
    )
    triggers = {t["name"]: t for t in spec["triggers"]}
    assert set(triggers) == {"queue-depth", "kv-cache-usage", "activity"}
    assert triggers["queue-depth"]["metadata"]["threshold"] == "3"
    kv = triggers["kv-cache-usage"]
    assert kv["metricType"] == "Value"  # already a per-group mean
    assert kv["metadata"]["threshold"] == "0.8"
    assert (
        kv["metadata"]["query"]
        == 'avg(vllm:kv_cache_usage_perc{job="vllm",deployment="qwen3-vl-2b"})'
    )
    assert triggers["activity"]["metadata"]["threshold"] == "1"
