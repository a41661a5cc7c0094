"""Cluster add-ons: pinned Helm releases, their values, IRSA, and the one Kubernetes provider."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kubernetes_validate
import pytest

from components.cluster_addons import (
    build_cluster_autoscaler_values,
    build_dcgm_exporter_values,
    build_efa_device_plugin_values,
    build_lws_values,
    build_nvidia_device_plugin_values,
)

# The taint every GPU node group sets, as Kubernetes spells it (EKS: NO_SCHEDULE).
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}


def tolerates(tolerations: list[dict[str, str]], taint: dict[str, str]) -> bool:
    """Kubernetes' toleration matching (Exists ignores the value; no effect matches all)."""
    return any(
        t.get("key") == taint["key"]
        and t.get("effect", taint["effect"]) == taint["effect"]
        and (t.get("operator") == "Exists" or t.get("value") == taint["value"])
        for t in tolerations
    )


def required_node_labels(affinity: dict[str, Any]) -> list[tuple[str, list[str]]]:
    terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    return [
        (e["key"], e["values"])
        for term in terms["nodeSelectorTerms"]
        for e in term["matchExpressions"]
        if e["operator"] == "In"
    ]


def test_nvidia_device_plugin_runs_on_tainted_gpu_nodes() -> None:
    values = build_nvidia_device_plugin_values()
    assert tolerates(values["tolerations"], GPU_TAINT)
    # The chart's default affinity needs Node Feature Discovery labels EKS nodes lack.
    assert required_node_labels(values["affinity"]) == [("qwen-vl-serving/role", ["gpu"])]


def test_efa_device_plugin_tolerates_the_gpu_taint_on_efa_nodes_only() -> None:
    values = build_efa_device_plugin_values()
    assert tolerates(values["tolerations"], GPU_TAINT)
    assert values["nodeSelector"] == {"qwen-vl-serving/efa": "true"}


def test_efa_device_plugin_keeps_the_charts_instance_type_allow_list() -> None:
    """The chart's default supportedInstanceLabels at the pinned version already lists every EFA
    type of the catalog (p4d/p4de included), so the values do not replace it; the rendered
    DaemonSet's affinity is checked against the catalog in tests/artifacts/test_helm_releases.py.
    The chart's template writes the CriticalAddonsOnly toleration itself: the values add only
    the GPU one, so no toleration is written twice."""
    values = build_efa_device_plugin_values()
    assert "supportedInstanceLabels" not in values
    assert values["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]


def pod_fields(values: dict[str, Any]) -> dict[str, Any]:
    """A Pod carrying the pod-spec fields the charts copy verbatim from our values."""
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "i"}]}
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        if key in values:
            spec[key] = values[key]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "values"}, "spec": spec}


@pytest.mark.parametrize(
    "build",
    [
        build_nvidia_device_plugin_values,
        build_efa_device_plugin_values,
        build_dcgm_exporter_values,
        build_lws_values,
        lambda: build_cluster_autoscaler_values(
            cluster_name="c", region="us-east-1", role_arn="arn", image_tag="v1.33.0"
        ),
    ],
    ids=["nvidia", "efa", "dcgm", "lws", "cluster-autoscaler"],
)
def test_pod_fields_of_the_values_pass_the_kubernetes_schema(
    build: Callable[[], dict[str, Any]],
) -> None:
    """The pod-spec parts of the values are valid Kubernetes 1.33 objects (strict: no unknown
    key). The charts themselves are rendered with helm in tests/artifacts/test_helm_releases.py."""
    pod = pod_fields(build())
    assert set(pod["spec"]) > {"containers"}
    kubernetes_validate.validate(pod, "1.33.0", strict=True)


def test_values_schema_check_can_fail() -> None:
    values = build_nvidia_device_plugin_values()
    values["tolerations"][0]["efect"] = values["tolerations"][0].pop("effect")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod_fields(values), "1.33.0", strict=True)


def test_dcgm_exporter_on_gpu_nodes_without_its_own_service_monitor() -> None:
    values = build_dcgm_exporter_values()
    assert tolerates(values["tolerations"], GPU_TAINT)
    assert values["nodeSelector"] == {"qwen-vl-serving/role": "gpu"}
    assert values["serviceMonitor"] == {"enabled": False}
    assert values["service"]["port"] == 9400


def test_controllers_run_on_system_nodes() -> None:
    assert build_lws_values()["nodeSelector"] == {"qwen-vl-serving/role": "system"}
    values = build_cluster_autoscaler_values(
        cluster_name="c", region="r", role_arn="arn", image_tag="v1"
    )
    assert values["nodeSelector"] == {"qwen-vl-serving/role": "system"}
    assert not tolerates(values.get("tolerations", []), GPU_TAINT)


def test_cluster_autoscaler_values() -> None:
    values = build_cluster_autoscaler_values(
        cluster_name="qwen-vl-dev",
        region="us-east-1",
        role_arn="arn:aws:iam::1:role/ca",
        image_tag="v1.33.0",
    )
    assert values["autoDiscovery"] == {"clusterName": "qwen-vl-dev"}
    assert values["awsRegion"] == "us-east-1"
    assert values["image"] == {"tag": "v1.33.0"}
    account = values["rbac"]["serviceAccount"]
    assert account["name"] == "cluster-autoscaler"
    assert account["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/ca"}
    # Engines mount an emptyDir at /dev/shm; with the default GPU nodes never scale down.
    assert values["extraArgs"]["skip-nodes-with-local-storage"] is False
