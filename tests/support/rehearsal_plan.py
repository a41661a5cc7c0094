"""Helpers shared by the rehearsal_plan tests of several layers."""

from __future__ import annotations

from pathlib import Path

from scripts.rehearsal import plan as P
from stacks.schema import Settings
from stacks.settings import load_stack_file, stack_file

STATE = Path("/srv/rehearsal")


LAYOUT = P.Layout(STATE)


def settings_of(stack: str) -> Settings:
    return load_stack_file(stack_file(stack))


def plan_of(
    stack: str, max_groups: int = 1, corruptions: tuple[P.Corruption, ...] = ()
) -> tuple[P.RehearsalPlan, P.RunSecrets, Settings]:
    settings = settings_of(stack)
    secrets = P.generate_secrets(settings)
    options = P.Options(run=stack, layout=LAYOUT, max_groups=max_groups, corruptions=corruptions)
    return P.plan_rehearsal(settings, secrets, options), secrets, settings
