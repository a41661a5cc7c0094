"""In CI a test skipped for a missing setup step fails instead.

A skip naming a `make` target or a program that is not installed means, on a developer's
machine, "run that step first". CI (.ci/run: CI=true, as root) runs `make test`, which has
done every such step (venv, debs, nginx-chroot, charts, engine) before pytest starts, so
there the same skip means a broken setup, and a run whose heavy tests all skipped would still
pass. Skips for what a stack does not use ("no multi-node deployment in this stack") or for
the chart mirror (CI has one only where ../shared/charts exists) stay skips.
"""

from __future__ import annotations

import os
import re
from collections.abc import Generator
from typing import Any

import pytest

SETUP_SKIP = re.compile(r"\bmake [a-z-]+|\bnot installed\b")


def setup_must_be_complete() -> bool:
    """CI as root (GitHub's unprivileged runner cannot run the root-only layers: skips stay)."""
    return os.environ.get("CI", "").lower() in {"1", "true"} and os.geteuid() == 0


def skip_reason(report: pytest.TestReport) -> str:
    longrepr: Any = report.longrepr
    reason = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.skipped and setup_must_be_complete():
        reason = skip_reason(report)
        if SETUP_SKIP.search(reason):
            report.outcome = "failed"
            report.longrepr = f"CI ran `make test`, which does this setup, yet: {reason}"
