"""Helpers shared by the settings tests of several layers."""

from __future__ import annotations

from typing import Any

import yaml

from stacks.settings import ROOT

NS = "qwen-vl-serving:"


Config = dict[str, Any]


def stack_config(stack: str) -> Config:
    return yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]
