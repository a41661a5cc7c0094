"""Node user data: a MIME multipart document whose every part is checked by its real consumer's rules.

This module: rendered files checked by the real programs that read them. The other layers' tests
of the same code: tests/unit/test_user_data.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.render.node_user_data import NodeUserDataArgs
from tests.support.platform_checks import (
    chrony_conf,
    cloud_config,
    run_chronyd_parse,
    run_cloud_init_schema,
)
from tests.support.user_data import NODES, parts_of

AWS_PHC_LINE = "refclock PHC /dev/ptp_ena poll 0 delay 0.000010 prefer"


@pytest.fixture(params=NODES, ids=["gpu-node", "phc-node"])
def args(request: pytest.FixtureRequest) -> NodeUserDataArgs:
    return request.param


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


def test_guard_leaves_a_config_chronyd_accepts(tmp_path: Path) -> None:
    """What the guard's sed leaves behind when /dev/ptp_ena is absent still parses."""
    conf = chrony_conf(parts_of(NodeUserDataArgs(phc=True, shutdown_grace_seconds=60)))
    without = "".join(
        line for line in conf.splitlines(keepends=True) if not line.startswith("refclock PHC")
    )
    result = run_chronyd_parse(without, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "refclock" not in result.stdout
