"""Helpers shared by the redis tests of several layers."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from stacks.parse import SettingsError
from stacks.settings import ROOT, build
from tests.support.harness import StackRun, run_stack
from tests.support.manifests import manifest

NS = "qwen-vl-serving:"


def stack_config(stack: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]


def problems(stack: str, **sections: dict[str, Any]) -> str:
    config = copy.deepcopy(stack_config(stack))
    for section, values in sections.items():
        config[NS + section] = {**config.get(NS + section, {}), **values}
    with pytest.raises(SettingsError) as err:
        build("test", stack, config)
    return str(err.value)


POLICY = "kubernetes:networking.k8s.io/v1:NetworkPolicy"


STS = "kubernetes:apps/v1:StatefulSet"


def doc(run: StackRun, typ: str, name: str) -> dict[str, Any]:
    return manifest(run.one(typ, name))


def peers(run: StackRun) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(peers admitted to 6379, peers admitted to 9121)."""
    rules = doc(run, POLICY, "redis-ingress")["spec"]["ingress"]
    by_port = {rule["ports"][0]["port"]: rule["from"] for rule in rules}
    assert set(by_port) == {6379, 9121}
    return by_port[6379], by_port[9121]


def run_variant(tmp_path: Path, stack: str, **sections: dict[str, Any]) -> StackRun:
    """Run the program on a copy of a stack file with some sections' keys changed."""
    config = copy.deepcopy(stack_config(stack))
    for section, values in sections.items():
        config[NS + section] = {**config.get(NS + section, {}), **values}
    path = tmp_path / f"Pulumi.{stack}.yaml"
    path.write_text(yaml.safe_dump({"config": config}))
    return run_stack(stack, path)
