"""Engine specs and pod templates of a stack's deployments, for the engine tests of every layer."""

from __future__ import annotations

from typing import Any

from components.render.vllm_command import (
    EngineSpec,
    engine_spec,
)
from stacks.naming import engine_secret_name
from stacks.planner import plan_for
from stacks.schema import Settings
from stacks.settings import ROOT, load_stack_file


def spec_of(stack: str, deployment: str) -> EngineSpec:
    settings = settings_of(stack)
    d = settings.deployment(deployment)
    plan = plan_for(settings, d)
    assert plan is not None
    return engine_spec(settings, d, plan, engine_secret_name(d.name))


def pod_templates(lws: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pod templates by role (a one-pod group has only the template LWS runs as its leader)."""
    lwt = lws["spec"]["leaderWorkerTemplate"]
    if "leaderTemplate" in lwt:
        return {"leader": lwt["leaderTemplate"], "worker": lwt["workerTemplate"]}
    return {"leader": lwt["workerTemplate"]}


def container(template: dict[str, Any]) -> dict[str, Any]:
    [only] = template["spec"]["containers"]
    return only


def settings_of(stack: str) -> Settings:
    return load_stack_file(ROOT / f"Pulumi.{stack}.yaml")
