"""The EKS cluster: control plane, IAM, OIDC, access entries, add-ons, system nodes, kubeconfig.

This module: the Pulumi program under mocks. The other layers' tests of the same code:
tests/artifacts/test_eks_cluster.py, tests/unit/test_eks_cluster.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from stacks.versions import addon_semver
from tests.support.eks_cluster import EFA_ONLY_MIN_VPC_CNI, STACKS, cluster
from tests.support.harness import (
    MOCK_CLUSTER_CA,
    StackRun,
    mock_cluster_endpoint,
    mock_oidc_issuer,
    run_stack,
)
from tests.support.platform_checks import (
    config_key,
    kubeconfig,
    mock_id,
    stack_variant,
)

ADDONS = {"vpc-cni", "kube-proxy", "eks-pod-identity-agent", "coredns", "aws-ebs-csi-driver"}


@pytest.fixture(scope="module", params=list(STACKS))
def run(request: pytest.FixtureRequest) -> StackRun:
    return run_stack(request.param)


def test_cluster_name_version_and_endpoint_access(run: StackRun) -> None:
    name, public, _ = STACKS[run.stack]
    inputs = cluster(run)
    assert inputs["name"] == name
    assert inputs["version"] == "1.33"
    assert inputs["vpcConfig"]["endpointPublicAccess"] is public
    assert inputs["vpcConfig"]["endpointPrivateAccess"] is True
    # API access entries only; the aws-auth ConfigMap is not used.
    assert inputs["accessConfig"]["authenticationMode"] == "API"


def test_only_prod_protects_the_cluster(run: StackRun) -> None:
    resource = run.one("aws:eks/cluster:Cluster", "eks-cluster")
    assert resource.protect is (run.stack == "prod")
    assert resource.inputs["deletionProtection"] is (run.stack == "prod")


def test_cluster_role_trusts_eks_and_has_the_cluster_policy(run: StackRun) -> None:
    role = run.one("aws:iam/role:Role", "eks-cluster-role")
    policy = json.loads(role.inputs["assumeRolePolicy"])
    assert policy["Statement"][0]["Principal"] == {"Service": "eks.amazonaws.com"}
    attachment = run.one(
        "aws:iam/rolePolicyAttachment:RolePolicyAttachment", "eks-cluster-amazoneksclusterpolicy"
    )
    assert attachment.inputs["policyArn"] == "arn:aws:iam::aws:policy/AmazonEKSClusterPolicy"


def test_oidc_provider_for_irsa_uses_the_cluster_issuer(run: StackRun) -> None:
    name, _, _ = STACKS[run.stack]
    oidc = run.one("aws:iam/openIdConnectProvider:OpenIdConnectProvider", "eks-oidc")
    assert oidc.inputs["url"] == mock_oidc_issuer(name)
    assert oidc.inputs["clientIdLists"] == ["sts.amazonaws.com"]


def test_managed_addons_pinned_and_vpc_cni_supports_efa_only(run: StackRun) -> None:
    addons = {
        a.inputs["addonName"]: a.inputs
        for a in run.of_type("aws:eks/addon:Addon")
        if a.name.startswith("eks-")  # the cluster's; the vision tier adds the EFS driver
    }
    assert set(addons) == ADDONS
    # Every add-on gets an explicit EKS add-on version (vX.Y.Z-eksbuild.N), never "latest".
    versions = {name: addon_semver(a["addonVersion"]) for name, a in addons.items()}
    # EKS builds kube-proxy per Kubernetes minor: it must be the cluster's (1.33 in every stack).
    assert versions["kube-proxy"][:2] == (1, 33)
    assert versions["vpc-cni"] >= EFA_ONLY_MIN_VPC_CNI


def test_node_level_addons_come_before_the_nodes_and_the_rest_after(run: StackRun) -> None:
    system = run.one("aws:eks/nodeGroup:NodeGroup", "eks-system")
    for addon in ("vpc-cni", "kube-proxy", "eks-pod-identity-agent"):
        assert run.one("aws:eks/addon:Addon", f"eks-{addon}").urn in system.dependencies
    for addon in ("coredns", "aws-ebs-csi-driver"):
        assert system.urn in run.one("aws:eks/addon:Addon", f"eks-{addon}").dependencies


def test_ebs_csi_driver_gets_its_irsa_role(run: StackRun) -> None:
    name, _, _ = STACKS[run.stack]
    addon = run.one("aws:eks/addon:Addon", "eks-aws-ebs-csi-driver")
    role = run.one("aws:iam/role:Role", "eks-ebs-csi-role")
    assert addon.inputs["serviceAccountRoleArn"] == "arn:aws:mock:::Role/eks-ebs-csi-role"
    trust = json.loads(role.inputs["assumeRolePolicy"])["Statement"][0]
    issuer = mock_oidc_issuer(name).removeprefix("https://")
    assert trust["Condition"]["StringEquals"][f"{issuer}:sub"] == (
        "system:serviceaccount:kube-system:ebs-csi-controller-sa"
    )
    assert trust["Principal"]["Federated"] == "arn:aws:mock:::OpenIdConnectProvider/eks-oidc"


def test_admin_roles_get_cluster_admin_access_entries(run: StackRun) -> None:
    entries = run.of_type("aws:eks/accessEntry:AccessEntry")
    policies = run.of_type("aws:eks/accessPolicyAssociation:AccessPolicyAssociation")
    if run.stack != "prod":
        assert entries == []
        assert policies == []
        return
    admin = "arn:aws:iam::123456789012:role/platform-admin"  # Pulumi.prod.yaml
    assert [e.inputs["principalArn"] for e in entries] == [admin]
    (policy,) = policies
    assert policy.inputs["principalArn"] == admin
    assert policy.inputs["policyArn"] == (
        "arn:aws:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy"
    )
    assert policy.inputs["accessScope"] == {"type": "cluster"}


def test_node_role_policies(run: StackRun) -> None:
    arns = {
        a.inputs["policyArn"]
        for a in run.of_type("aws:iam/rolePolicyAttachment:RolePolicyAttachment")
        if a.name.startswith("eks-node-")
    }
    for policy in ("AmazonEKSWorkerNodePolicy", "AmazonEKS_CNI_Policy"):
        assert f"arn:aws:iam::aws:policy/{policy}" in arns


def test_system_node_group(run: StackRun) -> None:
    _, _, (kind, lo, want, hi) = STACKS[run.stack]
    group = run.one("aws:eks/nodeGroup:NodeGroup", "eks-system")
    assert group.inputs["amiType"] == "AL2023_x86_64_STANDARD"
    assert group.inputs["version"] == "1.33"
    assert run.one("aws:eks/cluster:Cluster", "eks-cluster").urn in group.dependencies
    assert group.inputs["instanceTypes"] == [kind]
    assert group.inputs["scalingConfig"] == {"minSize": lo, "desiredSize": want, "maxSize": hi}
    assert group.inputs["labels"] == {"qwen-vl-serving/role": "system"}
    assert "taints" not in group.inputs
    assert group.inputs["launchTemplate"] == {"id": mock_id("eks-system-lt"), "version": "1"}
    # Cluster Autoscaler owns the node count after creation.
    assert group.ignore_changes == ["scalingConfig.desiredSize"]


def test_kubeconfig_authenticates_through_aws_eks_get_token(run: StackRun) -> None:
    name, _, _ = STACKS[run.stack]
    config = kubeconfig(run)
    (entry,) = config["clusters"]
    assert entry["cluster"]["server"] == mock_cluster_endpoint(name)
    assert entry["cluster"]["certificate-authority-data"] == MOCK_CLUSTER_CA
    exec_ = config["users"][0]["user"]["exec"]
    assert exec_["command"] == "aws"
    assert exec_["args"][:4] == ["eks", "get-token", "--cluster-name", name]
    assert exec_["args"][4:6] == ["--region", "us-east-1"]
    assert "token" not in config["users"][0]["user"]


def test_stack_outputs_name_the_cluster(run: StackRun) -> None:
    name, _, _ = STACKS[run.stack]
    assert run.outputs["cluster_name"] == name
    assert run.outputs["cluster_endpoint"] == mock_cluster_endpoint(name)
    assert json.loads(run.outputs["kubeconfig"]) == kubeconfig(run)


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory: pytest.TempPathFactory) -> StackRun:
    def edit(config: dict[str, Any]) -> None:
        config[config_key("cluster")] = {
            "mode": "existing",
            "name": "shared-gpu",
            "version": "1.33",
        }
        config[config_key("network")] = {
            "mode": "existing",
            "vpcId": "vpc-0shared",
            "privateSubnetIds": {"us-east-1a": "subnet-0a", "us-east-1b": "subnet-0b"},
        }

    path = stack_variant(tmp_path_factory.mktemp("eks"), "dev", "existingeks", edit)
    return run_stack("existingeks", path)


def test_existing_cluster_is_looked_up_not_created(existing_run: StackRun) -> None:
    made = {r.type for r in existing_run.resources}
    for kind in (
        "aws:eks/cluster:Cluster",
        "aws:eks/addon:Addon",
        "aws:iam/openIdConnectProvider:OpenIdConnectProvider",
    ):
        assert kind not in made
    assert (
        existing_run.one("aws:eks/nodeGroup:NodeGroup", "eks-system").inputs["clusterName"]
        == "shared-gpu"
    )
    assert kubeconfig(existing_run)["clusters"][0]["cluster"]["server"] == (
        mock_cluster_endpoint("shared-gpu")
    )


def test_existing_cluster_irsa_trusts_its_oidc_provider(existing_run: StackRun) -> None:
    role = existing_run.one("aws:iam/role:Role", "addons-cluster-autoscaler-role")
    trust = json.loads(role.inputs["assumeRolePolicy"])["Statement"][0]
    issuer = mock_oidc_issuer("shared-gpu").removeprefix("https://")
    assert trust["Principal"]["Federated"] == f"arn:aws:iam::123456789012:oidc-provider/{issuer}"


def test_vpc_cni_enforces_network_policies(run: StackRun) -> None:
    """Without enableNetworkPolicy the VPC CNI ignores every NetworkPolicy
    (docs/reference/eks-network-policy.md); the agent needs vpc-cni v1.14.0+."""
    addons = {a.inputs["addonName"]: a.inputs for a in run.of_type("aws:eks/addon:Addon")}
    cni = addons["vpc-cni"]
    assert json.loads(cni["configurationValues"]) == {"enableNetworkPolicy": "true"}
    assert addon_semver(cni["addonVersion"]) >= (1, 14, 0)
    others = {name: a.get("configurationValues") for name, a in addons.items() if name != "vpc-cni"}
    assert set(others.values()) == {None}
