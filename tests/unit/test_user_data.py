"""Node user data: a MIME multipart document whose every part is checked by its real consumer's rules."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml

from components.node_user_data import NodeUserDataArgs, render_node_user_data
from tests.unit.platform_checks import (
    chrony_conf,
    cloud_config,
    decode_user_data,
    node_config,
    run_chronyd_parse,
    run_cloud_init_schema,
)

AWS_PHC_LINE = "refclock PHC /dev/ptp_ena poll 0 delay 0.000010 prefer"


def parts_of(args: NodeUserDataArgs) -> dict[str, str]:
    return decode_user_data(base64.b64encode(render_node_user_data(args).encode()).decode())


@pytest.fixture(
    params=[
        pytest.param(NodeUserDataArgs(phc=False, shutdown_grace_seconds=75), id="gpu-node"),
        pytest.param(NodeUserDataArgs(phc=True, shutdown_grace_seconds=60), id="phc-node"),
    ]
)
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


def test_time_sync_part_passes_cloud_init_schema(args: NodeUserDataArgs, tmp_path: Path) -> None:
    body = parts_of(args)["text/cloud-config"]
    result = run_cloud_init_schema(body, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # cloud-init 22.4 accepts unknown top-level keys: hold the part to the ones it needs.
    assert set(cloud_config(parts_of(args))) == {"write_files", "runcmd"}


def test_cloud_init_schema_check_can_fail(tmp_path: Path) -> None:
    document = cloud_config(parts_of(NodeUserDataArgs(phc=False, shutdown_grace_seconds=75)))
    document["write_files"][0]["permissions"] = 644  # cloud-init wants a string
    result = run_cloud_init_schema("#cloud-config\n" + yaml.safe_dump(document), tmp_path)
    assert result.returncode != 0


def test_installed_chrony_conf_passes_chronyd(args: NodeUserDataArgs, tmp_path: Path) -> None:
    conf = chrony_conf(parts_of(args))
    result = run_chronyd_parse(conf, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "server 169.254.169.123 prefer iburst minpoll 4 maxpoll 4" in result.stdout
    assert (AWS_PHC_LINE in result.stdout) is args.phc


def test_chronyd_is_restarted_on_the_new_config(args: NodeUserDataArgs) -> None:
    runcmd = cloud_config(parts_of(args))["runcmd"]
    assert runcmd[-1] == ["systemctl", "restart", "chronyd"]


def test_phc_nodes_drop_the_refclock_when_the_device_is_missing() -> None:
    phc = cloud_config(parts_of(NodeUserDataArgs(phc=True, shutdown_grace_seconds=60)))
    plain = cloud_config(parts_of(NodeUserDataArgs(phc=False, shutdown_grace_seconds=60)))
    guard = ["sh", "-c", "test -e /dev/ptp_ena || sed -i '/^refclock PHC/d' /etc/chrony.conf"]
    assert phc["runcmd"][0] == guard
    assert guard not in plain["runcmd"]


def test_guard_leaves_a_config_chronyd_accepts(tmp_path: Path) -> None:
    """What the guard's sed leaves behind when /dev/ptp_ena is absent still parses."""
    conf = chrony_conf(parts_of(NodeUserDataArgs(phc=True, shutdown_grace_seconds=60)))
    without = "".join(
        line for line in conf.splitlines(keepends=True) if not line.startswith("refclock PHC")
    )
    result = run_chronyd_parse(without, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "refclock" not in result.stdout


def test_shutdown_grace_must_leave_time_for_regular_pods() -> None:
    with pytest.raises(ValueError, match="must exceed the 15 s kept for critical pods"):
        NodeUserDataArgs(phc=False, shutdown_grace_seconds=15)
