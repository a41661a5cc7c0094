"""tests/conftest.py: in CI as root a skip for a missing setup step fails; other skips stay."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

SKIPS = """
import pytest

@pytest.mark.skipif(True, reason="nginx is not installed (make debs)")
def test_marked(): ...

def test_inline():
    pytest.skip("real vLLM engine missing (make engine): no model")

def test_not_used_by_this_stack():
    pytest.skip("no multi-node deployment in this stack")
"""


def run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str, euid: int
) -> dict[str, int]:
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    pytester.makeconftest((Path(__file__).parents[1] / "conftest.py").read_text())
    pytester.makepyfile(SKIPS)
    return pytester.runpytest_inprocess("-p", "no:cacheprovider").parseoutcomes()


def test_in_ci_as_root_setup_skips_fail(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the marked skip happens at setup, so pytest reports it as an error
    assert run(pytester, monkeypatch, "true", 0) == {"failed": 1, "errors": 1, "skipped": 1}


@pytest.mark.parametrize(("ci", "euid"), [("", 0), ("true", 1000), ("false", 0)])
def test_elsewhere_they_stay_skips(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str, euid: int
) -> None:
    assert run(pytester, monkeypatch, ci, euid) == {"skipped": 3}
