"""chrony.conf rendering: AWS's lines (docs/reference/eks-nodes.md#chrony-lines), PHC gating, and chronyd's own verdict."""

from __future__ import annotations

import pytest

from components.render.time_sync import render_chrony_conf
from stacks.catalog import instance_type, supports_phc
from tests.support.time_sync import directives

# The lines AWS gives for chrony (docs/reference/eks-nodes.md#chrony-lines), copied from docs/reference/eks-nodes.md#chrony-lines, not from the renderer.
AWS_SERVER_LINE = "server 169.254.169.123 prefer iburst minpoll 4 maxpoll 4"


AWS_POOL_LINE = "pool time.aws.com iburst"


AWS_PHC_LINE = "refclock PHC /dev/ptp_ena poll 0 delay 0.000010 prefer"


def test_default_config_uses_the_amazon_time_sync_service_first() -> None:
    lines = directives(render_chrony_conf(phc=False))
    assert lines[0] == AWS_SERVER_LINE  # AWS: before any other server or pool line
    assert lines[1] == AWS_POOL_LINE
    assert "makestep 1.0 3" in lines
    assert "rtcsync" in lines
    assert "driftfile /var/lib/chrony/drift" in lines


def test_phc_reference_clock_only_when_asked_for() -> None:
    assert AWS_PHC_LINE not in directives(render_chrony_conf(phc=False))
    assert AWS_PHC_LINE in directives(render_chrony_conf(phc=True))


def test_rehearsal_can_point_chrony_at_its_own_server() -> None:
    conf = render_chrony_conf(phc=False, server="10.200.0.1", state_dir="/tmp/x")
    lines = directives(conf)
    assert lines[0] == "server 10.200.0.1 prefer iburst minpoll 4 maxpoll 4"
    assert lines[1] == AWS_POOL_LINE
    assert "169.254.169.123" not in conf
    assert "driftfile /tmp/x/drift" in lines


@pytest.mark.parametrize(
    ("kind", "region", "phc"),
    [
        pytest.param("m7i.xlarge", "us-east-1", True, id="m7i-in-a-phc-region"),
        pytest.param("m7i.xlarge", "eu-west-1", False, id="m7i-outside-phc-regions"),
        pytest.param("p5.48xlarge", "us-east-1", False, id="no-gpu-family-has-phc"),
        pytest.param("g6e.xlarge", "ap-northeast-1", False, id="g6e-in-tokyo"),
    ],
)
def test_phc_follows_the_families_and_regions_aws_lists(kind: str, region: str, phc: bool) -> None:
    instance = instance_type(kind)
    assert instance is not None
    assert supports_phc(instance, region) is phc
