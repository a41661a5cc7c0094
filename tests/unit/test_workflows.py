"""The GitHub workflows: valid against GitHub's schema, and the delivery rules they encode.

Schema validation uses check-jsonschema's vendored copy of the workflow schema (offline).
The guard scripts of destroy.yml are executed, not just read.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from scripts.affected_stacks import affected, stacks_in
from tests.support.harness import ROOT
from tests.support.workflows import WORKFLOWS, load, steps

NAMES = ["preview", "deploy", "promote", "destroy"]


PINNED = re.compile(r"^[\w.-]+/[\w.-]+@(?:[0-9a-f]{40}|v\d+)$")


def uses(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in steps(job) if str(s.get("uses", "")).startswith(action + "@")]


def all_jobs() -> list[tuple[str, str, dict[str, Any]]]:
    return [(n, j, job) for n in NAMES for j, job in load(n)["jobs"].items()]


def test_every_workflow_exists() -> None:
    assert sorted(p.stem for p in WORKFLOWS.glob("*.yml")) == sorted(NAMES)


def test_destroy_destroys_only_after_the_guards() -> None:
    job = load("destroy")["jobs"]["destroy"]
    names = [s.get("name") or s.get("uses", "") for s in steps(job)]
    destroy_at = next(
        i for i, s in enumerate(steps(job)) if s.get("with", {}).get("command") == "destroy"
    )
    assert names.index("Refuse prod and unconfirmed runs") < destroy_at
    assert names.index("Refuse a stack configured as prod or protected") < destroy_at


def test_promotion_deploys_only_after_the_environment_approval() -> None:
    jobs = load("promote")["jobs"]
    assert [s for s in steps(jobs["promote"]) if "pulumi/actions" in str(s.get("uses"))] == []
    apply = jobs["apply"]
    assert apply["needs"] == "promote"
    assert apply["environment"] == "${{ inputs.target }}"
    assert [s["with"]["command"] for s in uses(apply, "pulumi/actions")] == ["up"]
    assert any("-m scripts.promote" in s.get("run", "") for s in steps(jobs["promote"]))
    assert uses(jobs["promote"], "peter-evans/create-pull-request")


def test_promotion_targets_and_sources() -> None:
    workflow = load("promote")
    assert workflow["on"]["workflow_dispatch"]["inputs"]["target"]["options"] == ["staging", "prod"]
    assert workflow["env"]["SOURCE"] == "${{ inputs.target == 'prod' && 'staging' || 'dev' }}"


@pytest.mark.parametrize(
    ("workflow", "job", "name"), [(n, j, f"{n}.{j}") for n, j, _ in all_jobs()]
)
def test_aws_access_is_oidc_only(workflow: str, job: str, name: str) -> None:
    document = load(workflow)
    spec = document["jobs"][job]
    logins = uses(spec, "aws-actions/configure-aws-credentials")
    if not logins:
        return
    permissions = spec.get("permissions", document.get("permissions", {}))
    assert permissions.get("id-token") == "write", name
    for login in logins:
        assert set(login["with"]) >= {"role-to-assume", "aws-region"}, name
        assert not {"aws-access-key-id", "aws-secret-access-key"} & set(login["with"]), name
        assert login["with"]["role-to-assume"].startswith("${{ vars."), name


def test_every_stack_update_is_serialised_per_stack() -> None:
    groups: dict[str, str] = {}
    for workflow, name, job in all_jobs():
        for s in uses(job, "pulumi/actions"):
            if s["with"]["command"] in ("up", "destroy"):
                concurrency = job.get("concurrency") or load(workflow)["concurrency"]
                assert concurrency["cancel-in-progress"] is False, f"{workflow}.{name}"
                groups[f"{workflow}.{name}"] = concurrency["group"]
    assert groups == {
        "deploy.deploy-dev": "pulumi-dev",
        "promote.apply": "pulumi-${{ inputs.target }}",
        "destroy.destroy": "pulumi-${{ inputs.stack }}",
    }


def test_previews_run_per_affected_stack_after_the_tests() -> None:
    jobs = load("preview")["jobs"]
    assert any(s.get("run") == "make test" for s in steps(jobs["test"]))
    preview = jobs["preview"]
    assert preview["needs"] == ["test", "changes"]
    assert preview["strategy"]["matrix"]["stack"] == "${{ fromJSON(needs.changes.outputs.stacks) }}"
    assert (
        preview["concurrency"]["group"]
        == "preview-${{ matrix.stack }}-${{ github.event.pull_request.number }}"
    )
    (pulumi,) = uses(preview, "pulumi/actions")
    assert (pulumi["with"]["command"], pulumi["with"]["policyPacks"]) == ("preview", "policy")
    assert any(
        "-m scripts.cost" in s.get("run", "") and "--markdown" in s["run"] for s in steps(preview)
    )
    assert uses(preview, "marocchino/sticky-pull-request-comment")


def test_deploy_runs_dev_then_verifies_it() -> None:
    job = load("deploy")["jobs"]["deploy-dev"]
    (pulumi,) = uses(job, "pulumi/actions")
    assert (pulumi["with"]["command"], pulumi["with"]["stack-name"]) == ("up", "dev")
    runs = [s.get("run", "") for s in steps(job)]
    up_at = steps(job).index(pulumi)
    verify_at = next(
        i for i, r in enumerate(runs) if "-m scripts.verify --stack dev --target kubectl" in r
    )
    assert up_at < verify_at


def test_actions_are_pinned() -> None:
    """Full commit sha where known, else a major version tag; never a branch."""
    found = [s["uses"] for _, _, job in all_jobs() for s in steps(job) if "uses" in s]
    assert found
    assert [u for u in found if not PINNED.match(u)] == []


STACKS = ["dev", "prod", "staging"]


@pytest.mark.parametrize(
    ("changed", "expected"),
    [
        pytest.param(["Pulumi.staging.yaml"], ["staging"], id="one-stack-file"),
        pytest.param(["Pulumi.dev.yaml", "docs/delivery.md"], ["dev"], id="stack-and-docs"),
        pytest.param(["components/gateway.py"], STACKS, id="shared-code"),
        pytest.param(["Pulumi.yaml"], STACKS, id="project-file"),
        pytest.param(["requirements.lock"], STACKS, id="lock"),
        pytest.param(["policy/rules.py", "Pulumi.dev.yaml"], STACKS, id="policy"),
        pytest.param(["README.md", "tests/unit/test_cost.py", ".verify/dev.json"], [], id="inert"),
        pytest.param(["Pulumi.old.yaml"], [], id="deleted-stack"),
    ],
)
def test_affected_stacks(changed: list[str], expected: list[str]) -> None:
    assert affected(changed, STACKS) == expected


def test_the_repository_stacks_are_found() -> None:
    assert stacks_in(ROOT) == STACKS
