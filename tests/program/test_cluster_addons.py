"""Cluster add-ons: pinned Helm releases, their values, IRSA, and the one Kubernetes provider.

This module: the Pulumi program under mocks. The other layers' tests of the same code:
tests/unit/test_cluster_addons.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from components.cluster_addons import (
    build_cluster_autoscaler_values,
    build_dcgm_exporter_values,
    build_efa_device_plugin_values,
    build_lws_values,
    build_nvidia_device_plugin_values,
)
from stacks.versions import HELM_CHARTS
from tests.support.harness import StackRun, mock_oidc_issuer, run_stack
from tests.support.platform_checks import config_key, k8s_provider, stack_variant

STACKS = {"dev": "qwen-vl-dev", "staging": "qwen-vl-staging", "prod": "qwen-vl-prod"}


RELEASES = {
    "addons-nvidia-device-plugin": ("nvidia-device-plugin", "kube-system"),
    "addons-aws-efa-k8s-device-plugin": ("aws-efa-k8s-device-plugin", "kube-system"),
    "addons-dcgm-exporter": ("dcgm-exporter", "kube-system"),
    "addons-lws": ("lws", "lws-system"),
    "addons-cluster-autoscaler": ("cluster-autoscaler", "kube-system"),
}


@pytest.fixture(scope="module", params=list(STACKS))
def run(request: pytest.FixtureRequest) -> StackRun:
    return run_stack(request.param)


def release(run: StackRun, name: str) -> dict[str, Any]:
    return run.one("kubernetes:helm.sh/v3:Release", name).inputs


def test_device_plugin_charts_are_the_published_ones(run: StackRun) -> None:
    efa = release(run, "addons-aws-efa-k8s-device-plugin")
    # Eks/aws-efa-k8s-device-plugin, chart version v0.5.30 (see docs/reference/aws-efa.md#efa-device-plugin).
    assert (efa["chart"], efa["version"], efa["repositoryOpts"]["repo"]) == (
        "aws-efa-k8s-device-plugin",
        "v0.5.30",
        "https://aws.github.io/eks-charts",
    )
    # Nvdp/nvidia-device-plugin from https://nvidia.github.io/k8s-device-plugin (see docs/reference/eks-nodes.md#nvidia-device-plugin).
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
    assert inputs["chart"] == chart.reference
    assert inputs["version"] == chart.version
    assert inputs["namespace"] == namespace
    assert inputs.get("repositoryOpts", {}).get("repo") == chart.repository
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
