"""Every version the platform installs, pinned in one place: Helm charts and EKS add-ons.

Two tables, one row per thing installed:
- HELM_CHARTS: release key -> chart, repository, version and the archive's published sha256.
  `make charts` fetches exactly these (tests render every release with the real helm).
- KUBERNETES_PINS: Kubernetes minor version -> the EKS managed add-on versions and the Cluster
  Autoscaler image built for that minor. A cluster version without a row is refused by the
  settings rules, so an upgrade starts by adding the row here.

How to move a chart pin: docs/delivery.md#chart-pins (helm pull the new version, record the
sha256 of the archive it writes, run the tests). Add-on pins: `aws eks describe-addon-versions
--kubernetes-version <minor> --addon-name <name>`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final


@dataclass(frozen=True, kw_only=True)
class HelmChart:
    """One chart at one version.

    `repo` is a chart repository URL (https://) or an OCI registry path (oci://); `digest` is
    the sha256 of the archive `helm pull --version` returns, as the repository publishes it
    (the `digest` of its index.yaml entry), or None where it could not yet be read.
    """

    chart: str
    version: str
    repo: str
    digest: str | None

    @property
    def is_oci(self) -> bool:
        return self.repo.startswith("oci://")

    @property
    def reference(self) -> str:
        """What helm and Pulumi's Release take as `chart`: the name, or the full OCI path."""
        return f"{self.repo}/{self.chart}" if self.is_oci else self.chart

    @property
    def repository(self) -> str | None:
        """The repository URL for helm's --repo; None for OCI charts (the path names it)."""
        return None if self.is_oci else self.repo


NVIDIA_DEVICE_PLUGIN: Final = "nvidia-device-plugin"
EFA_DEVICE_PLUGIN: Final = "aws-efa-k8s-device-plugin"
DCGM_EXPORTER: Final = "dcgm-exporter"
LEADER_WORKER_SET: Final = "lws"
CLUSTER_AUTOSCALER: Final = "cluster-autoscaler"
KUBE_PROMETHEUS_STACK: Final = "kube-prometheus-stack"
KEDA: Final = "keda"

# Why each version: docs/delivery.md#chart-pins.
HELM_CHARTS: Mapping[str, HelmChart] = MappingProxyType(
    {
        NVIDIA_DEVICE_PLUGIN: HelmChart(
            chart="nvidia-device-plugin",
            version="0.18.0",
            repo="https://nvidia.github.io/k8s-device-plugin",
            digest="3abe7949ce08e14dac6a3ebf81d6e2ed3fca15a0a0fb751e67de40c72761d4e4",
        ),
        # Chart versions of aws/eks-charts carry a "v".
        EFA_DEVICE_PLUGIN: HelmChart(
            chart="aws-efa-k8s-device-plugin",
            version="v0.5.30",
            repo="https://aws.github.io/eks-charts",
            digest="43b3d666f81a40b7f7ac88ee04a64954abaaa061b1e5f54dc7ce4beb3374e32a",
        ),
        DCGM_EXPORTER: HelmChart(
            chart="dcgm-exporter",
            version="4.8.2",
            repo="https://nvidia.github.io/dcgm-exporter/helm-charts",
            digest="1c5535c03ebab3f021444df6016fce1cd7871385122e115c6ed24c804b623803",
        ),
        # v0.8.0 added leaderWorkerTemplate.volumeClaimTemplates (weights.cache: pvc). The
        # project publishes the chart only to its OCI registry: no index digest to record.
        LEADER_WORKER_SET: HelmChart(
            chart="lws", version="v0.10.0", repo="oci://registry.k8s.io/lws/charts", digest=None
        ),
        CLUSTER_AUTOSCALER: HelmChart(
            chart="cluster-autoscaler",
            version="9.50.1",
            repo="https://kubernetes.github.io/autoscaler",
            digest="ad4cfec95e23f4378342c86560c0eb25e5aa9a39d0b59d077a35c09f012ba053",
        ),
        # Prometheus Operator v0.93.1 (the chart's appVersion); its index digest was not readable.
        KUBE_PROMETHEUS_STACK: HelmChart(
            chart="kube-prometheus-stack",
            version="88.5.3",
            repo="https://prometheus-community.github.io/helm-charts",
            digest=None,
        ),
        KEDA: HelmChart(
            chart="keda",
            version="2.20.2",
            repo="https://kedacore.github.io/charts",
            digest="db60b1fa60f0565fefa4ce2f87e855b6a8854363ee82962fbe28a12a70d64c4c",
        ),
    }
)


def helm_chart(key: str) -> HelmChart:
    return HELM_CHARTS[key]


VPC_CNI: Final = "vpc-cni"
KUBE_PROXY: Final = "kube-proxy"
COREDNS: Final = "coredns"
POD_IDENTITY_AGENT: Final = "eks-pod-identity-agent"
EBS_CSI_DRIVER: Final = "aws-ebs-csi-driver"
# Installed by the vision tier only; EKS picks the add-on's default version for the cluster's
# Kubernetes version (not pinned here: docs/vision.md#what-is-not-pinned).
EFS_CSI_DRIVER: Final = "aws-efs-csi-driver"


@dataclass(frozen=True, kw_only=True)
class KubernetesPins:
    """What is installed alongside one Kubernetes minor version."""

    addons: Mapping[str, str]  # EKS managed add-on name -> addon version
    # Cluster Autoscaler's minor must match the cluster's (its compatibility policy).
    cluster_autoscaler_image_tag: str


KUBERNETES_PINS: Mapping[str, KubernetesPins] = MappingProxyType(
    {
        "1.33": KubernetesPins(
            addons=MappingProxyType(
                {
                    VPC_CNI: "v1.20.1-eksbuild.3",
                    KUBE_PROXY: "v1.33.5-eksbuild.2",
                    COREDNS: "v1.12.4-eksbuild.1",
                    POD_IDENTITY_AGENT: "v1.3.8-eksbuild.2",
                    EBS_CSI_DRIVER: "v1.48.0-eksbuild.2",
                }
            ),
            cluster_autoscaler_image_tag="v1.33.0",
        ),
    }
)


def kubernetes_pins(version: str) -> KubernetesPins | None:
    return KUBERNETES_PINS.get(version)


_ADDON_VERSION = re.compile(r"^v(\d+)\.(\d+)\.(\d+)-eksbuild\.\d+$")


def addon_semver(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of an EKS add-on version such as v1.20.1-eksbuild.3."""
    match = _ADDON_VERSION.match(version)
    if match is None:
        raise ValueError(f"not an EKS add-on version (vX.Y.Z-eksbuild.N): {version!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


# `server ... resolve` became open source in 1.27.3 (docs/reference/nginx.md#upstream-resolve); the
# gateway image must have it.
NGINX_RESOLVE_MIN_VERSION: Final = (1, 27, 3)
