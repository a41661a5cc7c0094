"""Helpers shared by the dashboards tests of several layers."""

from __future__ import annotations

from stacks.schema import Settings
from stacks.settings import ROOT, load_stack_file

STACKS = ["dev", "staging", "prod"]


def settings_of(stack: str) -> Settings:
    return load_stack_file(ROOT / f"Pulumi.{stack}.yaml")
