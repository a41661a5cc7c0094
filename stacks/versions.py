"""Every version the platform installs, pinned in one place: Helm charts and EKS add-ons.

Two tables, one row per thing installed:
- HELM_CHARTS: release key -> chart, repository and version. Other stages add their charts
  (kube-prometheus-stack, KEDA, ...) as new rows and look them up with `helm_chart(key)`.
- KUBERNETES_PINS: Kubernetes minor version -> the EKS managed add-on versions and the Cluster
  Autoscaler image built for that minor. A cluster version without a row is refused by the
  settings rules, so an upgrade starts by adding the row here.

Pins were read from the projects' release pages and the EKS user guide's "latest version" tables;
before changing one, confirm it with `helm search repo <repo>/<chart> --versions` or
`aws eks describe-addon-versions --kubernetes-version <minor> --addon-name <name>`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final


@dataclass(frozen=True, kw_only=True)
class HelmChart:
    """One chart: `chart` is its name in `repo`, or a full oci:// reference when `repo` is None."""

    chart: str
    version: str
    repo: str | None = None


NVIDIA_DEVICE_PLUGIN: Final = "nvidia-device-plugin"
EFA_DEVICE_PLUGIN: Final = "aws-efa-k8s-device-plugin"
DCGM_EXPORTER: Final = "dcgm-exporter"
LEADER_WORKER_SET: Final = "lws"
CLUSTER_AUTOSCALER: Final = "cluster-autoscaler"
KUBE_PROMETHEUS_STACK: Final = "kube-prometheus-stack"
KEDA: Final = "keda"

HELM_CHARTS: Mapping[str, HelmChart] = MappingProxyType(
    {
        NVIDIA_DEVICE_PLUGIN: HelmChart(
            chart="nvidia-device-plugin",
            version="0.18.0",
            repo="https://nvidia.github.io/k8s-device-plugin",
        ),
        # aws/eks-charts stable/aws-efa-k8s-device-plugin; chart versions carry a "v"
        # (docs/reference/aws-efa.md#efa-device-plugin).
        EFA_DEVICE_PLUGIN: HelmChart(
            chart="aws-efa-k8s-device-plugin",
            version="v0.5.30",
            repo="https://aws.github.io/eks-charts",
        ),
        DCGM_EXPORTER: HelmChart(
            chart="dcgm-exporter",
            version="4.8.3",
            repo="https://nvidia.github.io/dcgm-exporter/helm-charts",
        ),
        # The LeaderWorkerSet project publishes its chart only as an OCI artifact.
        LEADER_WORKER_SET: HelmChart(chart="oci://registry.k8s.io/lws/charts/lws", version="0.7.0"),
        CLUSTER_AUTOSCALER: HelmChart(
            chart="cluster-autoscaler",
            version="9.50.1",
            repo="https://kubernetes.github.io/autoscaler",
        ),
        # Prometheus Operator v0.88.0 (the chart's appVersion): PodMonitor `portNumber` needs it.
        KUBE_PROMETHEUS_STACK: HelmChart(
            chart="kube-prometheus-stack",
            version="81.4.5",
            repo="https://prometheus-community.github.io/helm-charts",
        ),
        KEDA: HelmChart(chart="keda", version="2.20.2", repo="https://kedacore.github.io/charts"),
    }
)


def helm_chart(key: str) -> HelmChart:
    return HELM_CHARTS[key]


VPC_CNI: Final = "vpc-cni"
KUBE_PROXY: Final = "kube-proxy"
COREDNS: Final = "coredns"
POD_IDENTITY_AGENT: Final = "eks-pod-identity-agent"
EBS_CSI_DRIVER: Final = "aws-ebs-csi-driver"


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
