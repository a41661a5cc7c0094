"""Cluster add-ons: pinned Helm releases, their values, IRSA, and the one Kubernetes provider."""

from __future__ import annotations

import json
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
from components.versions import HELM_CHARTS
from tests.harness import StackRun, mock_oidc_issuer, run_stack
from tests.unit.platform_checks import config_key, k8s_provider, stack_variant

STACKS = {"dev": "qwen-vl-dev", "staging": "qwen-vl-staging", "prod": "qwen-vl-prod"}
# The taint every GPU node group sets, as Kubernetes spells it (EKS: NO_SCHEDULE).
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}
RELEASES = {
    "addons-nvidia-device-plugin": ("nvidia-device-plugin", "kube-system"),
    "addons-aws-efa-k8s-device-plugin": ("aws-efa-k8s-device-plugin", "kube-system"),
    "addons-dcgm-exporter": ("dcgm-exporter", "kube-system"),
    "addons-lws": ("lws", "lws-system"),
    "addons-cluster-autoscaler": ("cluster-autoscaler", "kube-system"),
}
# facts §A1: every GPU type with EFA (main table, and the g5/g6/g6e sizes that have it).
EFA_TYPES = [
    "p4d.24xlarge",
    "p4de.24xlarge",
    "p5.4xlarge",
    "p5.48xlarge",
    "p5e.48xlarge",
    "p5en.48xlarge",
    "p6-b200.48xlarge",
    "p6-b300.48xlarge",
    *(
        f"{family}.{size}"
        for family in ("g5", "g6", "g6e")
        for size in ("8xlarge", "12xlarge", "16xlarge", "24xlarge", "48xlarge")
    ),
]


@pytest.fixture(scope="module", params=list(STACKS))
def run(request: pytest.FixtureRequest) -> StackRun:
    return run_stack(request.param)


def release(run: StackRun, name: str) -> dict[str, Any]:
    return run.one("kubernetes:helm.sh/v3:Release", name).inputs


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


def test_efa_device_plugin_is_allowed_on_every_efa_type() -> None:
    """The chart's own allow-list has no p4d/p4de at the pinned version (facts §A4)."""
    allowed = build_efa_device_plugin_values()["supportedInstanceLabels"]
    assert allowed["keys"] == ["node.kubernetes.io/instance-type"]
    assert sorted(allowed["values"]) == sorted(EFA_TYPES)


def chart_affinity(values: dict[str, Any]) -> dict[str, Any]:
    """The required node affinity the EFA chart's DaemonSet template builds from
    supportedInstanceLabels (aws/eks-charts stable/aws-efa-k8s-device-plugin/templates)."""
    labels = values["supportedInstanceLabels"]
    terms = [
        {"matchExpressions": [{"key": key, "operator": "In", "values": labels["values"]}]}
        for key in labels["keys"]
    ]
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}
        }
    }


def pod_fields(values: dict[str, Any]) -> dict[str, Any]:
    """A Pod carrying the pod-spec fields the charts copy verbatim from our values."""
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "i"}]}
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        if key in values:
            spec[key] = values[key]
    if "supportedInstanceLabels" in values:
        spec["affinity"] = chart_affinity(values)
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
    """No helm binary exists here, so the charts are never rendered; what can be checked is that
    the pod-spec parts of the values are valid Kubernetes 1.33 objects (strict: no unknown key)."""
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


def test_device_plugin_charts_are_the_published_ones(run: StackRun) -> None:
    efa = release(run, "addons-aws-efa-k8s-device-plugin")
    # facts §A4: eks/aws-efa-k8s-device-plugin, chart version v0.5.30.
    assert (efa["chart"], efa["version"], efa["repositoryOpts"]["repo"]) == (
        "aws-efa-k8s-device-plugin",
        "v0.5.30",
        "https://aws.github.io/eks-charts",
    )
    # facts §A5: nvdp/nvidia-device-plugin from https://nvidia.github.io/k8s-device-plugin.
    nvidia = release(run, "addons-nvidia-device-plugin")
    assert (nvidia["chart"], nvidia["repositoryOpts"]["repo"]) == (
        "nvidia-device-plugin",
        "https://nvidia.github.io/k8s-device-plugin",
    )


@pytest.mark.parametrize("name", list(RELEASES))
def test_release_chart_pinned_from_the_versions_table(run: StackRun, name: str) -> None:
    key, namespace = RELEASES[name]
    inputs = release(run, name)
    chart = HELM_CHARTS[key]
    assert inputs["chart"] == chart.chart
    assert inputs["version"] == chart.version
    assert inputs["namespace"] == namespace
    assert inputs.get("repositoryOpts", {}).get("repo") == chart.repo
    assert inputs["createNamespace"] is (namespace != "kube-system")


def test_release_values_are_the_built_values(run: StackRun) -> None:
    assert (
        release(run, "addons-nvidia-device-plugin")["values"] == build_nvidia_device_plugin_values()
    )
    assert release(run, "addons-aws-efa-k8s-device-plugin")["values"] == (
        build_efa_device_plugin_values()
    )
    assert release(run, "addons-dcgm-exporter")["values"] == build_dcgm_exporter_values()
    assert release(run, "addons-dcgm-exporter")["name"] == "dcgm-exporter"
    assert release(run, "addons-lws")["values"] == build_lws_values()


def test_cluster_autoscaler_release_uses_its_irsa_role(run: StackRun) -> None:
    values = release(run, "addons-cluster-autoscaler")["values"]
    assert values == build_cluster_autoscaler_values(
        cluster_name=STACKS[run.stack],
        region="us-east-1",
        role_arn="arn:aws:mock:::Role/addons-cluster-autoscaler-role",
        image_tag="v1.33.0",  # Cluster Autoscaler's minor matches Kubernetes 1.33
    )


def test_cluster_autoscaler_role_trust_and_permissions(run: StackRun) -> None:
    cluster = STACKS[run.stack]
    role = run.one("aws:iam/role:Role", "addons-cluster-autoscaler-role")
    trust = json.loads(role.inputs["assumeRolePolicy"])["Statement"][0]
    issuer = mock_oidc_issuer(cluster).removeprefix("https://")
    assert trust["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert trust["Condition"]["StringEquals"][f"{issuer}:sub"] == (
        "system:serviceaccount:kube-system:cluster-autoscaler"
    )
    policy = json.loads(
        run.one("aws:iam/rolePolicy:RolePolicy", "addons-cluster-autoscaler-policy").inputs[
            "policy"
        ]
    )
    read, write = policy["Statement"]
    assert "eks:DescribeNodegroup" in read["Action"]
    assert set(write["Action"]) == {
        "autoscaling:SetDesiredCapacity",
        "autoscaling:TerminateInstanceInAutoScalingGroup",
    }
    # Only groups EKS tagged as this cluster's (the `<cluster>: owned` discovery tag).
    assert write["Condition"] == {
        "StringEquals": {f"aws:ResourceTag/k8s.io/cluster-autoscaler/{cluster}": "owned"}
    }


def test_releases_wait_for_the_system_nodes(run: StackRun) -> None:
    system = run.one("aws:eks/nodeGroup:NodeGroup", "eks-system").urn
    for name in RELEASES:
        assert system in run.one("kubernetes:helm.sh/v3:Release", name).dependencies


def test_every_kubernetes_resource_uses_the_cluster_provider(run: StackRun) -> None:
    provider = k8s_provider(run)
    reference = f"{provider.urn}::"
    found = [r for r in run.resources if r.type.startswith("kubernetes:") and r.custom]
    assert len(found) >= len(RELEASES) + 1  # the add-ons and the app namespace at least
    for resource in found:
        assert resource.provider.startswith(reference), f"{resource.type} {resource.name}"


def test_kubernetes_provider_is_built_from_the_cluster(run: StackRun) -> None:
    cluster = run.one("aws:eks/cluster:Cluster", "eks-cluster")
    assert cluster.urn in k8s_provider(run).dependencies


def test_cluster_autoscaler_can_be_turned_off(tmp_path_factory: pytest.TempPathFactory) -> None:
    def edit(config: dict[str, Any]) -> None:
        config[config_key("autoscaling")] = {"clusterAutoscaler": False}

    path = stack_variant(tmp_path_factory.mktemp("ca"), "dev", "noca", edit)
    run = run_stack("noca", path)
    names = {r.name for r in run.of_type("kubernetes:helm.sh/v3:Release")}
    assert "addons-cluster-autoscaler" not in names
    assert "addons-lws" in names
    assert not [r for r in run.resources if r.name.startswith("addons-cluster-autoscaler")]
