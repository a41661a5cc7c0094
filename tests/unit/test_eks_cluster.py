"""The EKS cluster: control plane, IAM, OIDC, access entries, add-ons, system nodes, kubeconfig."""

from __future__ import annotations

import pytest

from components.render.eks_spec import (
    build_addon_configuration,
    build_irsa_trust_policy,
    build_kubeconfig,
    managed_policy_arn,
    partition_of,
)
from stacks.versions import KUBERNETES_PINS, VPC_CNI, addon_semver
from tests.support.eks_cluster import EFA_ONLY_MIN_VPC_CNI, STACKS
from tests.support.harness import (
    StackRun,
    run_stack,
)


@pytest.fixture(scope="module", params=list(STACKS))
def run(request: pytest.FixtureRequest) -> StackRun:
    return run_stack(request.param)


def test_kubeconfig_builder_context_points_at_its_cluster() -> None:
    config = build_kubeconfig("c1", "https://x", "Q0E=", "eu-west-1")
    assert config["current-context"] == "c1"
    assert config["contexts"][0]["context"] == {"cluster": "c1", "user": "c1"}


@pytest.mark.parametrize(
    ("region", "arn"),
    [
        ("us-east-1", "arn:aws:iam::aws:policy/X"),
        ("cn-north-1", "arn:aws-cn:iam::aws:policy/X"),
        ("us-gov-west-1", "arn:aws-us-gov:iam::aws:policy/X"),
    ],
)
def test_managed_policy_arns_follow_the_partition(region: str, arn: str) -> None:
    assert managed_policy_arn(region, "X") == arn
    assert partition_of(region) == arn.split(":")[1]


def test_irsa_trust_is_limited_to_one_service_account() -> None:
    policy = build_irsa_trust_policy("arn:aws:iam::1:oidc-provider/o", "https://o/id/X", "ns", "sa")
    condition = policy["Statement"][0]["Condition"]["StringEquals"]
    assert condition == {
        "o/id/X:sub": "system:serviceaccount:ns:sa",
        "o/id/X:aud": "sts.amazonaws.com",
    }


@pytest.mark.parametrize("minor", list(KUBERNETES_PINS))
def test_every_pinned_kubernetes_version_has_matching_addons(minor: str) -> None:
    pins = KUBERNETES_PINS[minor]
    assert addon_semver(pins.addons["vpc-cni"]) >= EFA_ONLY_MIN_VPC_CNI
    # kube-proxy and Cluster Autoscaler are released per Kubernetes minor and must match it.
    major_minor = tuple(int(part) for part in minor.split("."))
    assert addon_semver(pins.addons["kube-proxy"])[:2] == major_minor
    assert pins.cluster_autoscaler_image_tag.startswith(f"v{minor}.")


def test_addon_version_parser_rejects_other_formats() -> None:
    assert addon_semver("v1.18.5-eksbuild.1") == (1, 18, 5)
    with pytest.raises(ValueError, match="not an EKS add-on version"):
        addon_semver("1.18.5")


def test_vpc_cni_configuration_turns_network_policy_on_for_every_pinned_version() -> None:
    for pins in KUBERNETES_PINS.values():
        assert build_addon_configuration(VPC_CNI, pins.addons[VPC_CNI]) == {
            "enableNetworkPolicy": "true"
        }
    assert build_addon_configuration("coredns", "v1.12.1-eksbuild.2") is None


def test_vpc_cni_older_than_the_network_policy_agent_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot enforce NetworkPolicy"):
        build_addon_configuration("vpc-cni", "v1.13.4-eksbuild.1")
