"""The EKS cluster: control plane, IAM, OIDC, access entries, add-ons, system nodes, kubeconfig."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from components.eks_spec import (
    build_irsa_trust_policy,
    build_kubeconfig,
    managed_policy_arn,
    partition_of,
)
from components.versions import KUBERNETES_PINS, addon_semver
from tests.harness import (
    MOCK_CLUSTER_CA,
    StackRun,
    mock_cluster_endpoint,
    mock_oidc_issuer,
    run_stack,
)
from tests.unit.platform_checks import (
    chrony_conf,
    config_key,
    decode_user_data,
    kubeconfig,
    mock_id,
    node_config,
    run_chronyd_parse,
    run_kubectl,
    self_signed_ca,
    stack_variant,
)

# From the stack files: cluster name, public endpoint, system nodes (type, min, desired, max).
STACKS = {
    "dev": ("qwen-vl-dev", True, ("m7i.xlarge", 1, 2, 3)),
    "staging": ("qwen-vl-staging", True, ("m7i.xlarge", 2, 2, 4)),
    "prod": ("qwen-vl-prod", False, ("m7i.2xlarge", 3, 3, 6)),
}
ADDONS = {"vpc-cni", "kube-proxy", "eks-pod-identity-agent", "coredns", "aws-ebs-csi-driver"}
# facts §A2: `efa-only` interfaces need VPC CNI >= 1.18.5.
EFA_ONLY_MIN_VPC_CNI = (1, 18, 5)


@pytest.fixture(scope="module", params=list(STACKS))
def run(request: pytest.FixtureRequest) -> StackRun:
    return run_stack(request.param)


def cluster(run: StackRun) -> dict[str, Any]:
    return run.one("aws:eks/cluster:Cluster", "eks-cluster").inputs


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
    addons = {a.inputs["addonName"]: a.inputs for a in run.of_type("aws:eks/addon:Addon")}
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


def test_system_nodes_run_chrony_with_the_phc(run: StackRun, tmp_path: Path) -> None:
    """m7i in us-east-1: a PHC family in a PHC region (facts §B)."""
    template = run.one("aws:ec2/launchTemplate:LaunchTemplate", "eks-system-lt")
    parts = decode_user_data(template.inputs["userData"])
    assert node_config(parts)["kind"] == "NodeConfig"
    conf = chrony_conf(parts)
    assert "refclock PHC /dev/ptp_ena poll 0 delay 0.000010 prefer" in conf.splitlines()
    assert run_chronyd_parse(conf, tmp_path).returncode == 0
    assert template.inputs["blockDeviceMappings"][0]["ebs"]["volumeType"] == "gp3"


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


def test_kubectl_reads_the_kubeconfig_as_written(run: StackRun, tmp_path: Path) -> None:
    config = kubeconfig(run)
    found = run_kubectl(config, ["config", "view", "--minify", "--raw", "-o", "json"], tmp_path)
    assert found.result.returncode == 0, found.result.stderr
    view = json.loads(found.result.stdout)
    # --raw re-encodes the CA it decoded; --minify resolves current-context -> cluster and user.
    for key in ("clusters", "contexts", "current-context"):
        assert view[key] == config[key]
    assert view["users"][0]["user"]["exec"]["args"] == config["users"][0]["user"]["exec"]["args"]


def test_kubectl_gets_its_token_from_aws_eks_get_token(run: StackRun, tmp_path: Path) -> None:
    name, _, _ = STACKS[run.stack]
    config = kubeconfig(run)
    # The mocks' CA is not a certificate, and kubectl builds its TLS config before it asks the
    # credential plugin; EKS returns a base64 PEM certificate there.
    config["clusters"][0]["cluster"]["certificate-authority-data"] = self_signed_ca(tmp_path)
    found = run_kubectl(config, ["get", "--raw", "/version", "--request-timeout=5s"], tmp_path)
    # It got as far as dialling the server, which the empty network namespace refuses.
    assert "Unable to connect to the server" in found.result.stderr, found.result.stderr
    assert found.aws_calls, found.result.stderr
    assert set(found.aws_calls) == {
        f"eks get-token --cluster-name {name} --region us-east-1 --output json"
    }
    info = found.exec_info[0]
    assert info["apiVersion"] == "client.authentication.k8s.io/v1beta1"
    assert info["spec"]["interactive"] is False  # interactiveMode: Never


def test_kubectl_check_can_fail(run: StackRun, tmp_path: Path) -> None:
    config = kubeconfig(run)
    config["clusters"][0]["cluster"]["certificate-authority-data"] = self_signed_ca(tmp_path)
    config["users"][0]["user"]["exec"]["interactiveMode"] = "Nevr"
    found = run_kubectl(config, ["get", "--raw", "/version", "--request-timeout=5s"], tmp_path)
    assert found.result.returncode != 0
    assert "invalid interactiveMode" in found.result.stderr
    assert found.aws_calls == []


def test_stack_outputs_name_the_cluster(run: StackRun) -> None:
    name, _, _ = STACKS[run.stack]
    assert run.outputs["cluster_name"] == name
    assert run.outputs["cluster_endpoint"] == mock_cluster_endpoint(name)
    assert json.loads(run.outputs["kubeconfig"]) == kubeconfig(run)


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
