"""The vision tier: the shared vision cache (EFS) and each deployment's encoder tier.

VisionCache: an encrypted EFS file system with a mount target in every private subnet behind a
security group that admits NFS from the cluster's nodes only, the EFS CSI driver as an EKS
add-on (IRSA role with AWS's managed policy), the StorageClass, the ReadWriteMany claim and the
connector ConfigMap. EncoderTier: one deployment's encoder Deployment, Service, expiry CronJob,
and (once Prometheus and KEDA exist) its PodMonitor and ScaledObject. Manifests come from
components/render/vision_tier.py; why EFS: docs/vision.md#why-efs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s

from components.eks_cluster import OidcIssuer, ServiceAccount, create_irsa_role
from components.render.eks_spec import managed_policy_arn
from components.render.vision_tier import (
    build_cache_claim,
    build_connector_configmap,
    build_encoder_deployment,
    build_encoder_pod_monitor,
    build_encoder_scaled_object,
    build_encoder_service,
    build_expiry_cronjob,
    build_storage_class,
)
from components.render.vllm_command import EngineSpec
from stacks.naming import NFS_PORT, SYSTEM_NAMESPACE, TYPE_PREFIX, encoder_name
from stacks.schema import DeploymentSettings
from stacks.versions import EFS_CSI_DRIVER

CACHE_TYPE: Final = f"{TYPE_PREFIX}:vision:VisionCache"
ENCODER_TYPE: Final = f"{TYPE_PREFIX}:vision:EncoderTier"
EFS_CSI_SERVICE_ACCOUNT: Final = "efs-csi-controller-sa"
EFS_CSI_POLICY: Final = "service-role/AmazonEFSCSIDriverPolicy"
MONITORING_API: Final = "monitoring.coreos.com/v1"
KEDA_API: Final = "keda.sh/v1alpha1"


@dataclass(frozen=True, kw_only=True)
class VisionCacheArgs:
    region: str
    cluster_name: pulumi.Input[str]
    vpc_id: pulumi.Input[str]
    subnet_ids: Sequence[pulumi.Input[str]]
    node_security_group_id: pulumi.Input[str]  # the EKS cluster security group the nodes use
    oidc: OidcIssuer
    namespace: pulumi.Input[str]
    throughput_mode: str
    max_size_gib: int
    tags: Mapping[str, str]
    provider: k8s.Provider
    protect: bool = False
    depends_on: Sequence[pulumi.Resource] = ()


class VisionCache(pulumi.ComponentResource):
    file_system: aws.efs.FileSystem
    claim: k8s.core.v1.PersistentVolumeClaim
    connector: k8s.core.v1.ConfigMap

    def __init__(
        self, name: str, args: VisionCacheArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(CACHE_TYPE, name, None, opts)
        self._name, self._args = name, args
        self.file_system = aws.efs.FileSystem(
            f"{name}-efs",
            encrypted=True,
            throughput_mode=args.throughput_mode,
            tags={**args.tags, "Name": f"{name}-vision-cache"},
            opts=self._aws(protect=args.protect),
        )
        mounts = self._mount_targets()
        addon = self._csi_driver()
        k8s_opts = pulumi.ResourceOptions(
            parent=self, provider=args.provider, depends_on=[addon, *mounts, *args.depends_on]
        )
        storage_class = build_storage_class("")
        storage_class["parameters"]["fileSystemId"] = self.file_system.id
        sc = k8s.storage.v1.StorageClass(
            f"{name}-storage-class",
            metadata=storage_class["metadata"],
            provisioner=storage_class["provisioner"],
            parameters=storage_class["parameters"],
            reclaim_policy=storage_class["reclaimPolicy"],
            volume_binding_mode=storage_class["volumeBindingMode"],
            opts=k8s_opts,
        )
        claim = build_cache_claim(args.max_size_gib)
        self.claim = k8s.core.v1.PersistentVolumeClaim(
            f"{name}-claim",
            metadata=_namespaced(claim["metadata"], args.namespace),
            spec=claim["spec"],
            opts=pulumi.ResourceOptions.merge(k8s_opts, pulumi.ResourceOptions(depends_on=[sc])),
        )
        configmap = build_connector_configmap()
        self.connector = k8s.core.v1.ConfigMap(
            f"{name}-connector",
            metadata=_namespaced(configmap["metadata"], args.namespace),
            data=configmap["data"],
            opts=k8s_opts,
        )
        self.register_outputs({"file_system_id": self.file_system.id})

    def _aws(self, **kwargs: Any) -> pulumi.ResourceOptions:
        return pulumi.ResourceOptions(parent=self, **kwargs)

    def _mount_targets(self) -> list[pulumi.Resource]:
        """NFS from the nodes only: the CSI node plugin mounts on the host, not in the pod."""
        args = self._args
        group = aws.ec2.SecurityGroup(
            f"{self._name}-efs-sg",
            vpc_id=args.vpc_id,
            description="EFS vision cache: NFS from the EKS nodes",
            ingress=[
                aws.ec2.SecurityGroupIngressArgs(
                    protocol="tcp",
                    from_port=NFS_PORT,
                    to_port=NFS_PORT,
                    security_groups=[args.node_security_group_id],
                    description="NFS from the cluster security group (every node)",
                )
            ],
            tags=dict(args.tags),
            opts=self._aws(),
        )
        return [
            aws.efs.MountTarget(
                f"{self._name}-mount-{i}",
                file_system_id=self.file_system.id,
                subnet_id=subnet,
                security_groups=[group.id],
                opts=self._aws(),
            )
            for i, subnet in enumerate(args.subnet_ids)
        ]

    def _csi_driver(self) -> aws.eks.Addon:
        args = self._args
        role = create_irsa_role(
            f"{self._name}-efs-csi-role",
            args.oidc,
            ServiceAccount(SYSTEM_NAMESPACE, EFS_CSI_SERVICE_ACCOUNT),
            args.tags,
            self._aws(),
        )
        attachment = aws.iam.RolePolicyAttachment(
            f"{self._name}-efs-csi-policy",
            role=role.name,
            policy_arn=managed_policy_arn(args.region, EFS_CSI_POLICY),
            opts=self._aws(),
        )
        return aws.eks.Addon(
            f"{self._name}-{EFS_CSI_DRIVER}",
            cluster_name=args.cluster_name,
            addon_name=EFS_CSI_DRIVER,
            resolve_conflicts_on_create="OVERWRITE",
            resolve_conflicts_on_update="OVERWRITE",
            service_account_role_arn=role.arn,
            tags=dict(args.tags),
            opts=self._aws(depends_on=[attachment, *args.depends_on]),
        )


@dataclass(frozen=True, kw_only=True)
class EncoderObservability:
    """Where the encoder tier is watched and scaled from (None parts: monitoring or KEDA off)."""

    monitoring_namespace: str
    scrape_interval: str
    monitoring: pulumi.Resource  # brings the PodMonitor CRD
    keda: pulumi.Resource | None = None  # brings the ScaledObject CRD
    prometheus_url: str = ""
    polling_interval_seconds: int = 15


@dataclass(frozen=True, kw_only=True)
class EncoderTierArgs:
    spec: EngineSpec  # the deployment's
    encoder_spec: EngineSpec  # the same deployment on the encoder node group
    namespace: str
    observability: EncoderObservability | None = None
    depends_on: Sequence[pulumi.Resource] = ()  # the cache claim, the connector, the engines


class EncoderTier(pulumi.ComponentResource):
    deployment: k8s.apps.v1.Deployment

    def __init__(
        self, name: str, args: EncoderTierArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(ENCODER_TYPE, name, None, opts)
        d = args.spec.deployment
        obs = args.observability
        child = pulumi.ResourceOptions(parent=self, depends_on=list(args.depends_on))
        manifest = build_encoder_deployment(args.spec, args.encoder_spec)
        # KEDA owns spec.replicas once it scales the encoders; Pulumi must not reset it.
        scaled = obs is not None and obs.keda is not None
        self.deployment = k8s.apps.v1.Deployment(
            f"{name}-deployment",
            metadata=_namespaced(manifest["metadata"], args.namespace),
            spec=manifest["spec"],
            opts=pulumi.ResourceOptions.merge(
                child, pulumi.ResourceOptions(ignore_changes=["spec.replicas"] if scaled else None)
            ),
        )
        for kind, build, resource in (
            ("service", build_encoder_service(d), k8s.core.v1.Service),
            ("expiry", build_expiry_cronjob(args.spec, args.encoder_spec), k8s.batch.v1.CronJob),
        ):
            resource(
                f"{name}-{kind}",
                metadata=_namespaced(build["metadata"], args.namespace),
                spec=build["spec"],
                opts=child,
            )
        if obs is not None:
            self._observe(name, d, args.namespace, obs)
        self.register_outputs({"encoder": encoder_name(d.name)})

    def _observe(
        self, name: str, d: DeploymentSettings, namespace: str, obs: EncoderObservability
    ) -> None:
        k8s.apiextensions.CustomResource(
            f"{name}-podmonitor",
            api_version=MONITORING_API,
            kind="PodMonitor",
            metadata={"name": encoder_name(d.name), "namespace": obs.monitoring_namespace},
            spec=build_encoder_pod_monitor(d, namespace, obs.scrape_interval),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[obs.monitoring]),
        )
        if obs.keda is None:
            return
        scaled = build_encoder_scaled_object(
            d,
            prometheus_url=obs.prometheus_url,
            polling_interval_seconds=obs.polling_interval_seconds,
        )
        k8s.apiextensions.CustomResource(
            f"{name}-scaledobject",
            api_version=KEDA_API,
            kind="ScaledObject",
            metadata=_namespaced(scaled["metadata"], namespace),
            spec=scaled["spec"],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[obs.keda, self.deployment]),
        )


def _namespaced(metadata: Mapping[str, Any], namespace: pulumi.Input[str]) -> Any:
    return {**metadata, "namespace": namespace}
