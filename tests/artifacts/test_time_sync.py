"""chrony.conf rendering: AWS's lines (docs/reference/eks-nodes.md#chrony-lines), PHC gating, and chronyd's own verdict.

This module: rendered files checked by the real programs that read them. The other layers' tests
of the same code: tests/unit/test_time_sync.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from components.render.time_sync import render_chrony_conf
from tests.support.platform_checks import run_chronyd_parse
from tests.support.time_sync import directives


@pytest.mark.parametrize(
    "conf",
    [
        pytest.param(render_chrony_conf(phc=False), id="ntp-only"),
        pytest.param(render_chrony_conf(phc=True), id="with-phc"),
        pytest.param(
            render_chrony_conf(phc=False, server="10.200.0.1", state_dir="/tmp/x"), id="rehearsal"
        ),
    ],
)
def test_chronyd_accepts_every_rendered_config(conf: str, tmp_path: Path) -> None:
    result = run_chronyd_parse(conf, tmp_path)
    assert result.returncode == 0, result.stderr
    # -p prints the directives it parsed: all of them, in order.
    assert result.stdout.split("\n")[:-1] == directives(conf)


def test_chronyd_check_rejects_a_broken_directive(tmp_path: Path) -> None:
    conf = render_chrony_conf(phc=True).replace("minpoll 4", "minpoll four")
    result = run_chronyd_parse(conf, tmp_path)
    assert result.returncode != 0
    assert "Could not parse server directive" in result.stderr + result.stdout
