"""The EKS cluster (new, or an existing one by name), its IAM and add-ons, and the system nodes."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from components.render.eks_spec import (
    ADMIN_ACCESS_POLICY,
    CLUSTER_POLICIES,
    EBS_CSI_POLICY,
    NODE_POLICIES,
    OIDC_AUDIENCE,
    access_policy_arn,
    build_addon_configuration,
    build_irsa_trust_policy,
    build_service_assume_role_policy,
    managed_policy_arn,
)
from components.render.node_group_spec import (
    CPU_AMI_TYPE,
    METADATA_OPTIONS,
    build_root_volume,
    build_system_labels,
)
from stacks.naming import SYSTEM_NAMESPACE, TYPE_PREFIX
from stacks.schema import ClusterSettings, SystemNodeSettings
from stacks.versions import (
    COREDNS,
    EBS_CSI_DRIVER,
    KUBE_PROXY,
    POD_IDENTITY_AGENT,
    VPC_CNI,
)

TYPE = f"{TYPE_PREFIX}:platform:EksCluster"
EBS_CSI_SERVICE_ACCOUNT = "ebs-csi-controller-sa"
# DaemonSets a node needs to become Ready (CNI, service routing, pod credentials): they must exist
# before the first node joins. The others are Deployments that need a node to become healthy.
ADDONS_BEFORE_NODES = (VPC_CNI, KUBE_PROXY, POD_IDENTITY_AGENT)
ADDONS_AFTER_NODES = (COREDNS, EBS_CSI_DRIVER)
# Cluster Autoscaler owns the node count once the group exists.
SCALING_IGNORE_CHANGES = ["scalingConfig.desiredSize"]


@dataclass(frozen=True, kw_only=True)
class EksClusterArgs:
    settings: ClusterSettings
    system_nodes: SystemNodeSettings
    region: str
    # Private subnets: the control plane's ENIs and the system nodes go here.
    subnet_ids: Sequence[pulumi.Input[str]]
    # MIME user data of the system nodes (components/render/node_user_data.py), not yet base64-encoded.
    system_user_data: str
    # EKS managed add-on name -> version (stacks/versions.py); used for a new cluster only.
    addon_versions: Mapping[str, str]
    tags: Mapping[str, str]
    # Protect the cluster from `pulumi destroy` and turn on EKS deletion protection (prod).
    protect: bool = False


@dataclass(frozen=True)
class OidcIssuer:
    """The cluster's OIDC issuer and the IAM provider that trusts it (for IRSA roles)."""

    provider_arn: pulumi.Input[str]
    issuer_url: pulumi.Input[str]


@dataclass(frozen=True)
class ServiceAccount:
    namespace: str
    name: str


@dataclass(frozen=True, kw_only=True)
class NodeLaunchSpec:
    """What every node launch template of the platform sets."""

    disk_gib: int
    fast_disk: bool  # GPU nodes: provisioned gp3 throughput for loading weights
    user_data: str  # MIME user data (components/render/node_user_data.py), not yet base64-encoded
    tags: Mapping[str, str]


def encode_user_data(user_data: str) -> str:
    """Launch templates take user data base64-encoded."""
    return base64.b64encode(user_data.encode()).decode()


def create_node_launch_template(
    name: str, spec: NodeLaunchSpec, opts: pulumi.ResourceOptions, **extra: Any
) -> aws.ec2.LaunchTemplate:
    """A node launch template: gp3 root volume, IMDSv2, user data, tags on instances and volumes.

    The plain data from components/render/node_group_spec.py goes through the provider's typed Args
    classes, so a misspelled key fails here instead of reaching AWS.
    """
    volume = build_root_volume(spec.disk_gib, fast=spec.fast_disk)
    tags = dict(spec.tags)
    return aws.ec2.LaunchTemplate(
        name,
        block_device_mappings=[
            aws.ec2.LaunchTemplateBlockDeviceMappingArgs(
                device_name=volume["device_name"],
                ebs=aws.ec2.LaunchTemplateBlockDeviceMappingEbsArgs(**volume["ebs"]),
            )
        ],
        metadata_options=aws.ec2.LaunchTemplateMetadataOptionsArgs(**METADATA_OPTIONS),
        user_data=encode_user_data(spec.user_data),
        tag_specifications=[
            aws.ec2.LaunchTemplateTagSpecificationArgs(resource_type="instance", tags=tags),
            aws.ec2.LaunchTemplateTagSpecificationArgs(resource_type="volume", tags=tags),
        ],
        update_default_version=True,
        tags=tags,
        opts=opts,
        **extra,
    )


def create_irsa_role(
    name: str,
    oidc: OidcIssuer,
    account: ServiceAccount,
    tags: Mapping[str, str],
    opts: pulumi.ResourceOptions,
) -> aws.iam.Role:
    """An IAM role that one Kubernetes service account assumes through the cluster's OIDC issuer."""
    trust = pulumi.Output.all(oidc.provider_arn, oidc.issuer_url).apply(
        lambda a: json.dumps(build_irsa_trust_policy(a[0], a[1], account.namespace, account.name))
    )
    return aws.iam.Role(name, assume_role_policy=trust, tags=dict(tags), opts=opts)


def _issuer(identities: Sequence[Any] | None) -> str:
    """The OIDC issuer URL in a cluster's `identities` output."""
    oidcs = identities[0].oidcs if identities else None
    return (oidcs[0].issuer or "") if oidcs else ""


class EksCluster(pulumi.ComponentResource):
    """Control plane, OIDC provider, access entries, managed add-ons and the system node group."""

    name: pulumi.Output[str]
    endpoint: pulumi.Output[str]
    # Node groups follow it, so raising cluster.version upgrades the control plane, then nodes.
    kubernetes_version: pulumi.Output[str]
    certificate_authority: pulumi.Output[str]
    oidc_issuer_url: pulumi.Output[str]
    oidc_provider_arn: pulumi.Output[str]
    oidc: OidcIssuer
    cluster_security_group_id: pulumi.Output[str]
    node_role_arn: pulumi.Output[str]
    system_node_group: aws.eks.NodeGroup
    # What GPU node groups wait for (node role policies, node-level add-ons).
    node_prerequisites: list[pulumi.Resource]
    # What Kubernetes workloads wait for (system nodes, DNS, storage driver).
    workload_prerequisites: list[pulumi.Resource]

    def __init__(
        self, name: str, args: EksClusterArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(TYPE, name, None, opts)
        self._args = args
        node_role, policies = self._create_node_role(name)
        self.node_role_arn = node_role.arn
        new = args.settings.mode == "new"
        if new:
            self._create_cluster(name)
            self._create_admin_access(name)
        else:
            self._lookup_cluster()
        self.oidc = OidcIssuer(self.oidc_provider_arn, self.oidc_issuer_url)
        # An existing cluster's add-ons belong to its owners (docs/platform.md lists what we need).
        early = self._create_addons(name, ADDONS_BEFORE_NODES, []) if new else []
        self.node_prerequisites = [*policies, *early]
        self.system_node_group = self._create_system_nodes(name)
        late = (
            self._create_addons(name, ADDONS_AFTER_NODES, [self.system_node_group]) if new else []
        )
        self.workload_prerequisites = [self.system_node_group, *late]
        self.register_outputs(
            {
                "name": self.name,
                "endpoint": self.endpoint,
                "kubernetes_version": self.kubernetes_version,
                "certificate_authority": self.certificate_authority,
                "oidc_issuer_url": self.oidc_issuer_url,
                "oidc_provider_arn": self.oidc_provider_arn,
                "cluster_security_group_id": self.cluster_security_group_id,
                "node_role_arn": self.node_role_arn,
                "system_node_group": self.system_node_group.id,
            }
        )

    def _child(self, **kwargs: Any) -> pulumi.ResourceOptions:
        return pulumi.ResourceOptions(parent=self, **kwargs)

    def _tags(self) -> dict[str, str]:
        return dict(self._args.tags)

    def _service_role(self, name: str, service: str, actions: list[str]) -> aws.iam.Role:
        policy = build_service_assume_role_policy(service, actions)
        return aws.iam.Role(
            name, assume_role_policy=json.dumps(policy), tags=self._tags(), opts=self._child()
        )

    def _attach(
        self, name: str, role: aws.iam.Role, policies: Sequence[str]
    ) -> list[pulumi.Resource]:
        return [
            aws.iam.RolePolicyAttachment(
                f"{name}-{policy.rsplit('/', 1)[-1].lower().replace('_', '-')}",
                role=role.name,
                policy_arn=managed_policy_arn(self._args.region, policy),
                opts=self._child(),
            )
            for policy in policies
        ]

    def _create_node_role(self, name: str) -> tuple[aws.iam.Role, list[pulumi.Resource]]:
        role = self._service_role(f"{name}-node-role", "ec2.amazonaws.com", ["sts:AssumeRole"])
        return role, self._attach(f"{name}-node", role, NODE_POLICIES)

    def _lookup_cluster(self) -> None:
        found = aws.eks.get_cluster_output(
            name=self._args.settings.name, opts=pulumi.InvokeOutputOptions(parent=self)
        )
        self.name = found.name
        self.endpoint = found.endpoint
        self.kubernetes_version = found.version
        self.certificate_authority = found.certificate_authorities.apply(lambda c: c[0].data)
        self.oidc_issuer_url = found.identities.apply(_issuer)
        self.cluster_security_group_id = found.vpc_config.cluster_security_group_id
        # An existing cluster must already have its IAM OIDC provider (IRSA); it is looked up.
        provider = aws.iam.get_open_id_connect_provider_output(
            url=self.oidc_issuer_url, opts=pulumi.InvokeOutputOptions(parent=self)
        )
        self.oidc_provider_arn = provider.arn

    def _create_cluster(self, name: str) -> None:
        s, args = self._args.settings, self._args
        role = self._service_role(
            f"{name}-cluster-role", "eks.amazonaws.com", ["sts:AssumeRole", "sts:TagSession"]
        )
        attached = self._attach(f"{name}-cluster", role, CLUSTER_POLICIES)
        cluster = aws.eks.Cluster(
            f"{name}-cluster",
            name=s.name,
            version=s.version,
            role_arn=role.arn,
            vpc_config={
                "subnet_ids": list(args.subnet_ids),
                "endpoint_public_access": s.endpoint_public_access,
                "endpoint_private_access": s.endpoint_private_access,
                "public_access_cidrs": list(s.public_access_cidrs)
                if s.endpoint_public_access
                else None,
            },
            # Access entries only (no aws-auth ConfigMap); whoever runs `pulumi up` is admin so
            # the Kubernetes provider can act right after creation.
            access_config={
                "authentication_mode": "API",
                "bootstrap_cluster_creator_admin_permissions": True,
            },
            # The managed add-ons below replace the self-managed CNI, kube-proxy and CoreDNS.
            bootstrap_self_managed_addons=False,
            enabled_cluster_log_types=["api", "audit", "authenticator"],
            deletion_protection=args.protect,
            tags=self._tags(),
            opts=self._child(protect=args.protect, depends_on=attached),
        )
        self.name = cluster.name
        self.endpoint = cluster.endpoint
        self.kubernetes_version = cluster.version
        self.certificate_authority = cluster.certificate_authority.apply(lambda c: c.data or "")
        self.oidc_issuer_url = cluster.identities.apply(_issuer)
        self.cluster_security_group_id = cluster.vpc_config.apply(
            lambda v: v.cluster_security_group_id or ""
        )
        oidc = aws.iam.OpenIdConnectProvider(
            f"{name}-oidc",
            url=self.oidc_issuer_url,
            client_id_lists=[OIDC_AUDIENCE],
            tags=self._tags(),
            opts=self._child(),
        )
        self.oidc_provider_arn = oidc.arn

    def _create_admin_access(self, name: str) -> None:
        """Cluster-admin for the platform team's roles through EKS access entries."""
        for i, principal in enumerate(self._args.settings.admin_role_arns):
            entry = aws.eks.AccessEntry(
                f"{name}-admin-{i}",
                cluster_name=self.name,
                principal_arn=principal,
                type="STANDARD",
                tags=self._tags(),
                opts=self._child(),
            )
            aws.eks.AccessPolicyAssociation(
                f"{name}-admin-{i}-policy",
                cluster_name=self.name,
                principal_arn=principal,
                policy_arn=access_policy_arn(self._args.region, ADMIN_ACCESS_POLICY),
                access_scope={"type": "cluster"},
                opts=self._child(depends_on=[entry]),
            )

    def _create_addons(
        self, name: str, addons: Sequence[str], depends_on: list[pulumi.Resource]
    ) -> list[pulumi.Resource]:
        created: list[pulumi.Resource] = []
        for addon in addons:
            role_arn = self._create_ebs_csi_role(name).arn if addon == EBS_CSI_DRIVER else None
            version = self._args.addon_versions[addon]
            # vpc-cni: {"enableNetworkPolicy": "true"}, or the NetworkPolicies are not enforced
            configuration = build_addon_configuration(addon, version)
            created.append(
                aws.eks.Addon(
                    f"{name}-{addon}",
                    cluster_name=self.name,
                    addon_name=addon,
                    addon_version=version,
                    configuration_values=json.dumps(configuration) if configuration else None,
                    # The add-on owns its objects: a field edited by hand is reset, not a failure.
                    resolve_conflicts_on_create="OVERWRITE",
                    resolve_conflicts_on_update="OVERWRITE",
                    service_account_role_arn=role_arn,
                    tags=self._tags(),
                    opts=self._child(depends_on=depends_on),
                )
            )
        return created

    def _create_ebs_csi_role(self, name: str) -> aws.iam.Role:
        role = create_irsa_role(
            f"{name}-ebs-csi-role",
            self.oidc,
            ServiceAccount(SYSTEM_NAMESPACE, EBS_CSI_SERVICE_ACCOUNT),
            self._tags(),
            self._child(),
        )
        self._attach(f"{name}-ebs-csi", role, [EBS_CSI_POLICY])
        return role

    def _create_system_nodes(self, name: str) -> aws.eks.NodeGroup:
        nodes, tags = self._args.system_nodes, self._tags()
        spec = NodeLaunchSpec(
            disk_gib=nodes.disk_gib,
            fast_disk=False,
            user_data=self._args.system_user_data,
            tags=tags,
        )
        template = create_node_launch_template(f"{name}-system-lt", spec, self._child())
        return aws.eks.NodeGroup(
            f"{name}-system",
            cluster_name=self.name,
            node_role_arn=self.node_role_arn,
            subnet_ids=list(self._args.subnet_ids),
            ami_type=CPU_AMI_TYPE,
            version=self.kubernetes_version,
            instance_types=[nodes.instance_type],
            capacity_type="ON_DEMAND",
            scaling_config={
                "min_size": nodes.min_size,
                "desired_size": nodes.desired_size,
                "max_size": nodes.max_size,
            },
            labels=build_system_labels(),
            launch_template={"id": template.id, "version": template.latest_version.apply(str)},
            update_config={"max_unavailable": 1},
            tags=tags,
            opts=self._child(
                depends_on=self.node_prerequisites, ignore_changes=SCALING_IGNORE_CHANGES
            ),
        )
