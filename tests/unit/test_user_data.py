"""Node user data: a MIME multipart document whose every part is checked by its real consumer's rules."""

from __future__ import annotations

import pytest

from components.render.node_user_data import NodeUserDataArgs
from tests.support.platform_checks import (
    cloud_config,
    node_config,
)
from tests.support.user_data import NODES, parts_of


@pytest.fixture(params=NODES, ids=["gpu-node", "phc-node"])
def args(request: pytest.FixtureRequest) -> NodeUserDataArgs:
    return request.param


def test_user_data_has_a_nodeconfig_and_a_cloud_config_part(args: NodeUserDataArgs) -> None:
    assert list(parts_of(args)) == ["application/node.eks.aws", "text/cloud-config"]


def test_nodeconfig_is_a_nodeadm_document_with_the_shutdown_grace(args: NodeUserDataArgs) -> None:
    config = node_config(parts_of(args))
    assert config["apiVersion"] == "node.eks.aws/v1alpha1"
    assert config["kind"] == "NodeConfig"
    kubelet = config["spec"]["kubelet"]["config"]
    assert kubelet["shutdownGracePeriod"] == f"{args.shutdown_grace_seconds}s"
    assert kubelet["shutdownGracePeriodCriticalPods"] == "15s"
    # EKS writes the cluster part itself for amiType node groups; ours must not override it.
    assert "cluster" not in config["spec"]


def test_chronyd_is_restarted_on_the_new_config(args: NodeUserDataArgs) -> None:
    runcmd = cloud_config(parts_of(args))["runcmd"]
    assert runcmd[-1] == ["systemctl", "restart", "chronyd"]


def test_phc_nodes_drop_the_refclock_when_the_device_is_missing() -> None:
    phc = cloud_config(parts_of(NodeUserDataArgs(phc=True, shutdown_grace_seconds=60)))
    plain = cloud_config(parts_of(NodeUserDataArgs(phc=False, shutdown_grace_seconds=60)))
    guard = ["sh", "-c", "test -e /dev/ptp_ena || sed -i '/^refclock PHC/d' /etc/chrony.conf"]
    assert phc["runcmd"][0] == guard
    assert guard not in plain["runcmd"]


def test_shutdown_grace_must_leave_time_for_regular_pods() -> None:
    with pytest.raises(ValueError, match="must exceed the 15 s kept for critical pods"):
        NodeUserDataArgs(phc=False, shutdown_grace_seconds=15)
