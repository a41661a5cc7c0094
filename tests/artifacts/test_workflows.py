"""The GitHub workflows: valid against GitHub's schema, and the delivery rules they encode.

This module: rendered files checked by the real programs that read them. The other layers' tests
of the same code: tests/unit/test_workflows.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import ROOT
from tests.support.workflows import WORKFLOWS, load, steps

CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"


def step(job: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in steps(job) if s.get("name") == name)


def check_schema(*files: Path) -> subprocess.CompletedProcess[str]:
    command = [
        str(CHECK_JSONSCHEMA),
        "--builtin-schema",
        "vendor.github-workflows",
        *map(str, files),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_workflows_match_githubs_schema() -> None:
    result = check_schema(*sorted(WORKFLOWS.glob("*.yml")))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_catches_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text((WORKFLOWS / "destroy.yml").read_text().replace("runs-on:", "run-on:"))
    result = check_schema(broken)
    assert result.returncode == 1
    assert "broken.yml" in result.stdout


def run_guard(script: str, **env: str) -> int:
    environment = {"PATH": os.environ["PATH"], **env}
    return subprocess.run(
        ["bash", "-e", "-c", script],
        env=environment,
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    ).returncode


def test_destroy_refuses_prod_in_every_layer() -> None:
    workflow = load("destroy")
    assert "prod" not in workflow["on"]["workflow_dispatch"]["inputs"]["stack"]["options"]
    job = workflow["jobs"]["destroy"]
    assert job["if"] == "inputs.stack != 'prod'"
    guard = step(job, "Refuse prod and unconfirmed runs")["run"]
    assert run_guard(guard, STACK="prod", CONFIRM="prod") == 1
    assert run_guard(guard, STACK="dev", CONFIRM="staging") == 1
    assert run_guard(guard, STACK="dev", CONFIRM="dev") == 0


@pytest.mark.parametrize(("stack", "refused"), [("prod", True), ("staging", False), ("dev", False)])
def test_destroy_refuses_a_stack_configured_as_prod(stack: str, refused: bool) -> None:
    guard = step(
        load("destroy")["jobs"]["destroy"], "Refuse a stack configured as prod or protected"
    )["run"]
    script = guard.replace(".venv/bin/python", sys.executable)
    assert (run_guard(script, STACK=stack) != 0) is refused
