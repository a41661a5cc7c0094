"""Settings: every stack file loads; every mistake is reported with its key path and fix.

This module: rendered files checked by the real programs that read them. The other layers' tests
of the same code: tests/unit/test_settings.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from stacks.settings import ROOT
from tests.support.settings import NS, stack_config


def test_check_command_lists_every_problem_and_exits_one(tmp_path: Path) -> None:
    config = stack_config("dev")
    config[NS + "gateway"]["replicas"] = "two"
    config[NS + "serving"]["deployments"][0]["maxModelLen"] = "long"
    bad = tmp_path / "Pulumi.bad.yaml"
    bad.write_text(yaml.safe_dump({"config": config}))
    result = subprocess.run(
        [sys.executable, "-m", "scripts.check", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "gateway.replicas=two: must be an integer" in result.stderr
    assert "serving.deployments[0].maxModelLen=long: must be an integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_command_has_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scripts.check", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    assert "capacity plan" in result.stdout
