"""User data of every EKS node: a MIME multipart document with a nodeadm NodeConfig and chrony.

Pure (no Pulumi). Managed node groups with `amiType` set merge this document with the part EKS
writes (cluster name, endpoint, CA), so ours carries only what EKS does not: kubelet settings and
the time-sync configuration (AL2023 user data must be MIME multipart, and must not start or modify
kubelet itself: docs/reference/eks-nodes.md#al2023-user-data).

Parts, in order:
1. `application/node.eks.aws`: a NodeConfig read by nodeadm before kubelet starts.
2. `text/cloud-config`: writes /etc/chrony.conf (components/render/time_sync.py) and restarts chronyd.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import yaml

from components.render.time_sync import (
    CHRONY_CONF_PATH,
    CHRONYD_SERVICE,
    PHC_DEVICE,
    render_chrony_conf,
)

NODECONFIG_CONTENT_TYPE: Final = "application/node.eks.aws"
CLOUD_CONFIG_CONTENT_TYPE: Final = "text/cloud-config"
NODECONFIG_API_VERSION: Final = "node.eks.aws/v1alpha1"
BOUNDARY: Final = "==qwen-vl-serving-node=="
# Critical pods (device plugins, CNI) get the last seconds of a node's shutdown grace period.
CRITICAL_PODS_GRACE_SECONDS: Final = 15
# Image pulls in parallel: one 10+ GB vLLM image must not queue the small DaemonSet images.
MAX_PARALLEL_IMAGE_PULLS: Final = 4


@dataclass(frozen=True, kw_only=True)
class NodeUserDataArgs:
    # The instance type and region support the ENA PTP hardware clock (stacks.catalog.supports_phc).
    phc: bool
    # How long kubelet delays a node shutdown (scale-in, spot reclaim) so pods can drain; must
    # exceed CRITICAL_PODS_GRACE_SECONDS.
    shutdown_grace_seconds: int

    def __post_init__(self) -> None:
        if self.shutdown_grace_seconds <= CRITICAL_PODS_GRACE_SECONDS:
            raise ValueError(
                f"shutdown_grace_seconds={self.shutdown_grace_seconds} must exceed the "
                f"{CRITICAL_PODS_GRACE_SECONDS} s kept for critical pods"
            )


def build_node_config(args: NodeUserDataArgs) -> dict[str, Any]:
    """The nodeadm NodeConfig (merged over the one EKS writes)."""
    return {
        "apiVersion": NODECONFIG_API_VERSION,
        "kind": "NodeConfig",
        "spec": {
            "kubelet": {
                "config": {
                    # Graceful node shutdown: vLLM drains in-flight requests on SIGTERM.
                    "shutdownGracePeriod": f"{args.shutdown_grace_seconds}s",
                    "shutdownGracePeriodCriticalPods": f"{CRITICAL_PODS_GRACE_SECONDS}s",
                    "serializeImagePulls": False,
                    "maxParallelImagePulls": MAX_PARALLEL_IMAGE_PULLS,
                },
            },
        },
    }


def build_time_sync_cloud_config(args: NodeUserDataArgs) -> dict[str, Any]:
    """cloud-config that installs the rendered chrony.conf and restarts chronyd on it."""
    runcmd: list[list[str]] = []
    if args.phc:
        # chronyd exits if a refclock device cannot be opened; a node whose ENA driver has PHC
        # disabled keeps the NTP sources, themselves PHC-backed on such instances: see
        # the PHC notes in docs/reference/eks-nodes.md#phc-support.
        runcmd.append(
            ["sh", "-c", f"test -e {PHC_DEVICE} || sed -i '/^refclock PHC/d' {CHRONY_CONF_PATH}"]
        )
    runcmd.append(["systemctl", "restart", CHRONYD_SERVICE])
    return {
        "write_files": [
            {
                "path": CHRONY_CONF_PATH,
                "owner": "root:root",
                "permissions": "0644",
                "content": render_chrony_conf(phc=args.phc),
            }
        ],
        "runcmd": runcmd,
    }


class _LiteralDumper(yaml.SafeDumper):
    """Writes multi-line strings as `|` blocks so the chrony.conf stays readable on the node."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _represent_str)


def _dump(data: dict[str, Any]) -> str:
    return yaml.dump(data, Dumper=_LiteralDumper, sort_keys=False, default_flow_style=False)


def render_node_user_data(args: NodeUserDataArgs) -> str:
    """The MIME multipart user data (plain text; launch templates want it base64-encoded)."""
    parts = [
        (NODECONFIG_CONTENT_TYPE, "---\n" + _dump(build_node_config(args))),
        (
            f'{CLOUD_CONFIG_CONTENT_TYPE}; charset="us-ascii"',
            "#cloud-config\n" + _dump(build_time_sync_cloud_config(args)),
        ),
    ]
    lines = ["MIME-Version: 1.0", f'Content-Type: multipart/mixed; boundary="{BOUNDARY}"', ""]
    for content_type, body in parts:
        if BOUNDARY in body:
            raise ValueError(f"the MIME boundary {BOUNDARY!r} occurs in a {content_type} part")
        lines += [f"--{BOUNDARY}", f"Content-Type: {content_type}", "", body.rstrip("\n")]
    lines.append(f"--{BOUNDARY}--")
    return "\n".join(lines) + "\n"
