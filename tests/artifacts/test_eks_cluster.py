"""The EKS cluster: control plane, IAM, OIDC, access entries, add-ons, system nodes, kubeconfig.

This module: rendered files checked by the real programs that read them. The other layers' tests
of the same code: tests/program/test_eks_cluster.py, tests/unit/test_eks_cluster.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.eks_cluster import STACKS
from tests.support.harness import (
    StackRun,
    run_stack,
)
from tests.support.platform_checks import (
    chrony_conf,
    decode_user_data,
    kubeconfig,
    node_config,
    run_chronyd_parse,
    run_kubectl,
    self_signed_ca,
)


@pytest.fixture(scope="module", params=list(STACKS))
def run(request: pytest.FixtureRequest) -> StackRun:
    return run_stack(request.param)


def test_system_nodes_run_chrony_with_the_phc(run: StackRun, tmp_path: Path) -> None:
    """m7i in us-east-1: a PHC family in a PHC region (docs/reference/eks-nodes.md#chrony-lines)."""
    template = run.one("aws:ec2/launchTemplate:LaunchTemplate", "eks-system-lt")
    parts = decode_user_data(template.inputs["userData"])
    assert node_config(parts)["kind"] == "NodeConfig"
    conf = chrony_conf(parts)
    assert "refclock PHC /dev/ptp_ena poll 0 delay 0.000010 prefer" in conf.splitlines()
    assert run_chronyd_parse(conf, tmp_path).returncode == 0
    assert template.inputs["blockDeviceMappings"][0]["ebs"]["volumeType"] == "gp3"


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
