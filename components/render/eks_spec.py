"""IAM policy documents, ARNs and the kubeconfig of the EKS platform, as plain data.

Pure (no Pulumi): the components turn these into JSON inputs, and the tests assert on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from stacks.versions import VPC_CNI, addon_semver

IAM_VERSION: Final = "2012-10-17"
OIDC_AUDIENCE: Final = "sts.amazonaws.com"
ADMIN_ACCESS_POLICY: Final = "AmazonEKSClusterAdminPolicy"

CLUSTER_POLICIES: Final = ("AmazonEKSClusterPolicy",)
NODE_POLICIES: Final = (
    "AmazonEKSWorkerNodePolicy",
    # VPC CNI runs with the node role: it manages the node's ENIs and addresses.
    "AmazonEKS_CNI_Policy",
    "AmazonEC2ContainerRegistryReadOnly",
    # Shell access through Session Manager: no SSH keys and no inbound port on GPU nodes.
    "AmazonSSMManagedInstanceCore",
)
EBS_CSI_POLICY: Final = "service-role/AmazonEBSCSIDriverPolicy"


def partition_of(region: str) -> str:
    """The ARN partition of a region."""
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def managed_policy_arn(region: str, name: str) -> str:
    return f"arn:{partition_of(region)}:iam::aws:policy/{name}"


def access_policy_arn(region: str, name: str) -> str:
    """An EKS access policy (what an access entry is granted)."""
    return f"arn:{partition_of(region)}:eks::aws:cluster-access-policy/{name}"


def s3_gateway_service_name(region: str) -> str:
    prefix = "cn.com.amazonaws" if partition_of(region) == "aws-cn" else "com.amazonaws"
    return f"{prefix}.{region}.s3"


def build_service_assume_role_policy(service: str, actions: Sequence[str]) -> dict[str, Any]:
    """Trust policy letting an AWS service (eks.amazonaws.com, ec2.amazonaws.com) use a role."""
    return {
        "Version": IAM_VERSION,
        "Statement": [
            {"Effect": "Allow", "Principal": {"Service": service}, "Action": list(actions)}
        ],
    }


def oidc_issuer_host(issuer_url: str) -> str:
    """The issuer as IAM condition keys spell it: without the https:// scheme."""
    return issuer_url.removeprefix("https://")


def build_irsa_trust_policy(
    provider_arn: str, issuer_url: str, namespace: str, service_account: str
) -> dict[str, Any]:
    """Trust policy of an IAM role for one Kubernetes service account (IRSA)."""
    issuer = oidc_issuer_host(issuer_url)
    return {
        "Version": IAM_VERSION,
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Federated": provider_arn},
                "Action": "sts:AssumeRoleWithWebIdentity",
                "Condition": {
                    "StringEquals": {
                        f"{issuer}:sub": f"system:serviceaccount:{namespace}:{service_account}",
                        f"{issuer}:aud": OIDC_AUDIENCE,
                    }
                },
            }
        ],
    }


def build_cluster_autoscaler_policy(cluster_name: str) -> dict[str, Any]:
    """Cluster Autoscaler's permissions (its AWS provider README): read everything it needs to
    simulate node groups, and resize or terminate only the groups tagged as this cluster's."""
    return {
        "Version": IAM_VERSION,
        "Statement": [
            {
                "Effect": "Allow",
                "Action": [
                    "autoscaling:DescribeAutoScalingGroups",
                    "autoscaling:DescribeAutoScalingInstances",
                    "autoscaling:DescribeLaunchConfigurations",
                    "autoscaling:DescribeScalingActivities",
                    "autoscaling:DescribeTags",
                    "ec2:DescribeImages",
                    "ec2:DescribeInstanceTypes",
                    "ec2:DescribeLaunchTemplateVersions",
                    "ec2:GetInstanceTypesFromInstanceRequirements",
                    # labels and taints of managed node groups at zero nodes
                    "eks:DescribeNodegroup",
                ],
                "Resource": "*",
            },
            {
                "Effect": "Allow",
                "Action": [
                    "autoscaling:SetDesiredCapacity",
                    "autoscaling:TerminateInstanceInAutoScalingGroup",
                ],
                "Resource": "*",
                "Condition": {
                    "StringEquals": {
                        f"aws:ResourceTag/k8s.io/cluster-autoscaler/{cluster_name}": "owned"
                    }
                },
            },
        ],
    }


def build_kubeconfig(
    cluster_name: str, endpoint: str, certificate_authority: str, region: str
) -> dict[str, Any]:
    """A kubeconfig that authenticates as the caller's AWS identity through `aws eks get-token`.

    No token is stored: each request gets a short-lived one, so the kubeconfig is not a secret.
    """
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster_name,
                "cluster": {
                    "server": endpoint,
                    "certificate-authority-data": certificate_authority,
                },
            }
        ],
        "contexts": [
            {"name": cluster_name, "context": {"cluster": cluster_name, "user": cluster_name}}
        ],
        "current-context": cluster_name,
        "users": [
            {
                "name": cluster_name,
                "user": {
                    "exec": {
                        "apiVersion": "client.authentication.k8s.io/v1beta1",
                        "command": "aws",
                        "args": [
                            "eks",
                            "get-token",
                            "--cluster-name",
                            cluster_name,
                            "--region",
                            region,
                            "--output",
                            "json",
                        ],
                        "interactiveMode": "Never",
                    }
                },
            }
        ],
    }


# The VPC CNI enforces Kubernetes NetworkPolicy only when its add-on configuration says so
# (docs/reference/eks-network-policy.md); its network policy agent ships from v1.14.0 on.
VPC_CNI_NETWORK_POLICY_SINCE: Final = (1, 14, 0)
VPC_CNI_CONFIGURATION: Final = {"enableNetworkPolicy": "true"}


def build_addon_configuration(addon: str, version: str) -> dict[str, str] | None:
    """The `configurationValues` of a managed add-on (None: the add-on's defaults).

    vpc-cni: NetworkPolicy enforcement on. A pin older than the first release with the network
    policy agent is refused here rather than sent to EKS, where the key would be rejected or,
    worse, the policies silently not enforced.
    """
    if addon != VPC_CNI:
        return None
    if addon_semver(version) < VPC_CNI_NETWORK_POLICY_SINCE:
        since = ".".join(str(p) for p in VPC_CNI_NETWORK_POLICY_SINCE)
        raise ValueError(f"vpc-cni {version} cannot enforce NetworkPolicy (needs v{since}+)")
    return dict(VPC_CNI_CONFIGURATION)
