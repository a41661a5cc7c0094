"""The unit layer stays fast and pure: a test here that starts a program or runs the Pulumi
program under mocks fails, naming the layer it belongs to (docs/ARCHITECTURE.md, "Tests").

Hook wrappers rather than a fixture: module-scoped fixtures set up before any function
fixture could patch, and this conftest's hooks see only this directory's tests.
"""

from __future__ import annotations

import subprocess
from collections.abc import Generator
from contextlib import ExitStack
from typing import Any, NoReturn
from unittest import mock

import pulumi.runtime
import pytest


def _refuse(what: str, layer: str) -> Any:
    def refuse(*_args: Any, **_kwargs: Any) -> NoReturn:
        raise AssertionError(f"unit tests may not {what}: move this test to tests/{layer}/")

    return refuse


def _pure() -> ExitStack:
    stack = ExitStack()
    stack.enter_context(
        mock.patch.object(subprocess.Popen, "__init__", _refuse("start a program", "artifacts"))
    )
    stack.enter_context(
        mock.patch.object(pulumi.runtime, "set_mocks", _refuse("run the program", "program"))
    )
    return stack


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    with _pure():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    with _pure():
        return (yield)
