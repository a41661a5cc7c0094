"""The repository's shell scripts pass shellcheck, and every script a user or the Makefile may
run directly (a shebang line) is executable."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.harness import ROOT

SHELL_SCRIPTS = sorted([*ROOT.glob("scripts/**/*.sh"), ROOT / ".ci" / "run"])
WITH_SHEBANG = sorted(
    p for p in (ROOT / "scripts").rglob("*") if p.is_file() and p.read_bytes()[:2] == b"#!"
)


def test_the_lists_are_not_empty() -> None:
    assert ROOT / "scripts" / "lock-venv.sh" in SHELL_SCRIPTS
    assert ROOT / "scripts" / "sid-nginx.sh" in WITH_SHEBANG


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck is not installed (make debs)"
)
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck_finds_nothing(script: Path) -> None:
    result = subprocess.run(
        ["shellcheck", "--external-sources", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", WITH_SHEBANG, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_script_with_a_shebang_is_executable(script: Path) -> None:
    assert os.access(script, os.X_OK), f"chmod +x {script.relative_to(ROOT)}"
