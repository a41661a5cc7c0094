"""The real program runs for every stack under mocks."""

import pytest

from tests.harness import run_stack

STACKS = ["dev", "staging", "prod"]


@pytest.mark.parametrize("stack", STACKS)
def test_program_exports_the_stack_identity(stack: str) -> None:
    run = run_stack(stack)
    assert run.outputs["stack"] == stack
    assert run.outputs["environment"] == stack
