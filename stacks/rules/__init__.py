"""Cross-field validation of parsed settings. Every rule returns problems; none raises.

Rules are grouped by section so each stays short; `validate` runs them all and
the caller raises one SettingsError listing everything.
"""

from __future__ import annotations

from stacks.parse import Problem
from stacks.rules.common import Rule
from stacks.rules.data import data_rules, webui_rules
from stacks.rules.gateway import gateway_rules
from stacks.rules.observability import autoscaling_rules, observability_rules
from stacks.rules.platform import network_rules, node_group_rules, platform_rules, tag_rules
from stacks.rules.prod import prod_rules, warnings
from stacks.rules.serving import deployment_rules, engine_rules
from stacks.rules.vision import vision_rules
from stacks.schema import Settings

__all__ = ["RULES", "validate", "warnings"]


RULES: tuple[Rule, ...] = (
    tag_rules,
    network_rules,
    node_group_rules,
    deployment_rules,
    prod_rules,
    autoscaling_rules,
    engine_rules,
    observability_rules,
    platform_rules,
    data_rules,
    webui_rules,
    gateway_rules,
    vision_rules,
)


def validate(settings: Settings) -> list[Problem]:
    return [p for rule in RULES for p in rule(settings)]
