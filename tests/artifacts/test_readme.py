"""Every command the README shows runs as written: each `make` target exists (make's own dry
run), and each `python -m scripts.<tool>` is a module that starts and prints its usage."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def shown_commands() -> list[list[str]]:
    """Every line of the README's plain (shell) code blocks as words, comments dropped."""
    commands: list[list[str]] = []
    fence: str | None = None  # the info string of the open block, if one is open
    for line in README.splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
        elif fence == "" and line.split("#", 1)[0].strip():
            commands.append(shlex.split(line.split("#", 1)[0]))
    return commands


MAKE = [c for c in shown_commands() if c[0] == "make"]
TOOLS = [c for c in shown_commands() if c[:2] == [".venv/bin/python", "-m"]]


def test_the_readme_shows_both_kinds() -> None:
    assert len(MAKE) >= 5
    assert len(TOOLS) >= 3


@pytest.mark.parametrize("command", MAKE, ids=[" ".join(c) for c in MAKE])
def test_make_knows_the_target(command: list[str]) -> None:
    # -n: print the recipe without running it; an unknown target fails with "No rule".
    done = subprocess.run(
        [*command[:1], "-n", *command[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("command", TOOLS, ids=[" ".join(c) for c in TOOLS])
def test_the_tool_module_starts(command: list[str]) -> None:
    module = command[2]
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
