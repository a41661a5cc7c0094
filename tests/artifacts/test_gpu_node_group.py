"""GPU node groups per stack: EFA interfaces, placement, SG, labels, taint, autoscaler tags, user data.

This module: rendered files checked by the real programs that read them. The other layers' tests
of the same code: tests/program/test_gpu_node_group.py, tests/unit/test_gpu_node_group.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.gpu_node_group import GROUPS, ZONES, Group, by_id, launch_template
from tests.support.harness import StackRun, run_stack
from tests.support.platform_checks import (
    chrony_conf,
    decode_user_data,
    node_config,
    run_chronyd_parse,
)


@pytest.fixture(scope="module")
def runs() -> dict[str, StackRun]:
    return {stack: run_stack(stack) for stack in ZONES}


@by_id(GROUPS)
def test_user_data_configures_kubelet_and_chrony(
    runs: dict[str, StackRun], group: Group, tmp_path: Path
) -> None:
    parts = decode_user_data(launch_template(runs, group)["userData"])
    config = node_config(parts)
    assert (config["apiVersion"], config["kind"]) == ("node.eks.aws/v1alpha1", "NodeConfig")
    # Engines drain for 45 s (shutdownTimeoutSeconds default) + 15 s margin + 15 s critical pods.
    assert config["spec"]["kubelet"]["config"]["shutdownGracePeriod"] == "75s"
    conf = chrony_conf(parts)
    result = run_chronyd_parse(conf, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "server 169.254.169.123 prefer iburst minpoll 4 maxpoll 4" in result.stdout
    # No GPU family has the ENA PTP hardware clock (docs/reference/eks-nodes.md#chrony-lines).
    assert "refclock" not in result.stdout
