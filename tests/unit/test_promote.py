"""scripts/promote.py on temporary copies of the real stack files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from scripts.promote import main
from scripts.verification import Result, new_record, write_record
from stacks.settings import ROOT, load_stack_file

NEW_REVISION = "1111111111111111111111111111111111111111"
OLD_REVISION = "89644892e4d85e24eaac8bacfd4f463576704203"
NEW_IMAGE = "public.ecr.aws/deep-learning-containers/vllm:0.33.1-gpu-py312-cu130-ubuntu22.04-ec2"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    for stack in ("dev", "staging", "prod"):
        shutil.copy(ROOT / f"Pulumi.{stack}.yaml", tmp_path)
    return tmp_path


def edit(repo: Path, stack: str, old: str, new: str) -> None:
    path = repo / f"Pulumi.{stack}.yaml"
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1))


def verify(repo: Path, stack: str, result: Result = "passed") -> None:
    record = new_record(stack, repo / f"Pulumi.{stack}.yaml", target="kubectl", result=result)
    write_record(record, repo / ".verify")


def promote(repo: Path, *args: str) -> int:
    return main([*args, "--dir", str(repo)])


@pytest.fixture
def dev_ahead(repo: Path) -> Path:
    """dev runs a newer image, revision and body limit than staging, and was verified."""
    edit(repo, "dev", f'revision: "{OLD_REVISION}"', f'revision: "{NEW_REVISION}"')
    edit(
        repo,
        "dev",
        "vllmImage: public.ecr.aws/deep-learning-containers/vllm:0.33.0-gpu-py312-cu130-ubuntu22.04-ec2",
        f"vllmImage: {NEW_IMAGE}",
    )
    edit(repo, "dev", "    replicas: 1\n", "    replicas: 1\n    clientMaxBodySizeMib: 128\n")
    verify(repo, "dev")
    return repo


def test_promotable_values_are_copied(dev_ahead: Path) -> None:
    assert promote(dev_ahead, "dev", "staging") == 0
    staging = load_stack_file(dev_ahead / "Pulumi.staging.yaml")
    assert staging.deployment("qwen3-vl-2b").revision == NEW_REVISION
    assert staging.serving.vllm_image == NEW_IMAGE
    assert staging.gateway.client_max_body_size_mib == 128


def test_stack_specific_values_stay(dev_ahead: Path) -> None:
    assert promote(dev_ahead, "dev", "staging") == 0
    staging = load_stack_file(dev_ahead / "Pulumi.staging.yaml")
    # dev has 1 gateway replica, 512 MiB Redis and a 1-node GPU group; staging keeps its own.
    assert staging.gateway.replicas == 2
    assert staging.redis.maxmemory_mib == 1024
    assert staging.deployment("qwen3-vl-2b").replicas == 2
    assert staging.node_group("l40s").max_size == 3
    assert staging.cluster.name == "qwen-vl-staging"
    # the 32B deployment exists only in staging and is left alone
    assert staging.deployment("qwen3-vl-32b").revision == "0" * 40


def test_comments_and_key_order_survive(dev_ahead: Path) -> None:
    path = dev_ahead / "Pulumi.staging.yaml"
    before = path.read_text()
    assert promote(dev_ahead, "dev", "staging") == 0
    after = path.read_text()
    for comment in (
        "# staging: prod's shape at a fraction of its cost, so promotion rehearses what prod runs.",
        "      # EFA traffic stays inside one subnet: the whole group lives in one AZ",
        "        # 67 GB of weights from the Hub on a cold node, then NCCL init across nodes",
    ):
        assert comment in after.splitlines()
    keys = [line for line in before.splitlines() if line.startswith("  qwen-vl-serving:")]
    assert [line for line in after.splitlines() if line.startswith("  qwen-vl-serving:")] == keys


def test_only_the_promoted_lines_change(dev_ahead: Path) -> None:
    path = dev_ahead / "Pulumi.staging.yaml"
    before = path.read_text().splitlines()
    assert promote(dev_ahead, "dev", "staging") == 0
    after = path.read_text().splitlines()
    changed = sorted(set(after) - set(before))
    assert changed == sorted(
        [
            f'        revision: "{NEW_REVISION}"',
            f"    vllmImage: {NEW_IMAGE}",
            "    clientMaxBodySizeMib: 128",
        ]
    )


def test_the_diff_is_printed(dev_ahead: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert promote(dev_ahead, "dev", "staging", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "--- Pulumi.staging.yaml (current)" in out
    assert f'-        revision: "{OLD_REVISION}"' in out.splitlines()
    assert f'+        revision: "{NEW_REVISION}"' in out.splitlines()


def test_dry_run_writes_nothing(dev_ahead: Path) -> None:
    before = (dev_ahead / "Pulumi.staging.yaml").read_bytes()
    assert promote(dev_ahead, "dev", "staging", "--dry-run") == 0
    assert (dev_ahead / "Pulumi.staging.yaml").read_bytes() == before


def test_a_second_promotion_changes_nothing(
    dev_ahead: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert promote(dev_ahead, "dev", "staging") == 0
    once = (dev_ahead / "Pulumi.staging.yaml").read_bytes()
    capsys.readouterr()
    assert promote(dev_ahead, "dev", "staging") == 0
    assert (dev_ahead / "Pulumi.staging.yaml").read_bytes() == once
    assert "already has every promotable setting" in capsys.readouterr().out


def test_check_exits_nonzero_while_behind_and_zero_after(dev_ahead: Path) -> None:
    before = (dev_ahead / "Pulumi.staging.yaml").read_bytes()
    assert promote(dev_ahead, "dev", "staging", "--check") == 1
    assert (dev_ahead / "Pulumi.staging.yaml").read_bytes() == before
    assert promote(dev_ahead, "dev", "staging") == 0
    assert promote(dev_ahead, "dev", "staging", "--check") == 0


def test_a_missing_section_is_created_in_schema_order(repo: Path) -> None:
    edit(
        repo,
        "dev",
        "        nodeGroup: l40s\n",
        "        nodeGroup: l40s\n        weights:\n          s3Uri: s3://models/qwen3-vl-2b/\n",
    )
    verify(repo, "dev")
    assert promote(repo, "dev", "staging") == 0
    staging = load_stack_file(repo / "Pulumi.staging.yaml")
    assert staging.deployment("qwen3-vl-2b").weights.s3_uri == "s3://models/qwen3-vl-2b/"
    # weights is the last but one field of a deployment: it lands after the existing keys
    text = (repo / "Pulumi.staging.yaml").read_text()
    assert (
        "startupBudgetMinutes: 20\n        weights:\n          s3Uri: s3://models/qwen3-vl-2b/\n        autoscaling:"
        in text
    )


def test_refuses_without_a_verification_record(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (repo / "Pulumi.staging.yaml").read_bytes()
    assert promote(repo, "dev", "staging") == 1
    assert (repo / "Pulumi.staging.yaml").read_bytes() == before
    assert "refusing: dev has never been verified" in capsys.readouterr().err


def test_refuses_a_failed_verification(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    verify(repo, "dev", "failed")
    assert promote(repo, "dev", "staging") == 1
    assert "the latest verification of dev" in capsys.readouterr().err


def test_refuses_when_the_source_changed_since_verification(
    dev_ahead: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit(dev_ahead, "dev", "maxModelLen: 32768", "maxModelLen: 16384")
    before = (dev_ahead / "Pulumi.staging.yaml").read_bytes()
    assert promote(dev_ahead, "dev", "staging") == 1
    assert (dev_ahead / "Pulumi.staging.yaml").read_bytes() == before
    assert "Pulumi.dev.yaml changed since dev was verified" in capsys.readouterr().err


def test_refuses_when_the_destination_would_be_invalid(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # staging runs tag-only images; prod's rules demand digests, so the promotion must stop.
    verify(repo, "staging")
    before = (repo / "Pulumi.prod.yaml").read_bytes()
    assert promote(repo, "staging", "prod") == 1
    assert (repo / "Pulumi.prod.yaml").read_bytes() == before
    err = capsys.readouterr().err
    assert "Pulumi.prod.yaml would be invalid after the promotion" in err
    assert (
        "serving.vllmImage=public.ecr.aws/deep-learning-containers/vllm:0.33.0-gpu-py312-cu130-ubuntu22.04-ec2: prod images must be pinned by digest"
        in err
    )


def test_deployments_only_in_one_stack_are_reported_not_created(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert promote(repo, "staging", "prod", "--check") == 1
    out = capsys.readouterr().out
    assert "serving.deployments[qwen3-vl-32b] exists only in the source: not created" in out
    assert "serving.deployments[qwen3-vl-235b] exists only in the destination: left as it is" in out
    text = (repo / "Pulumi.prod.yaml").read_text()
    assert "qwen3-vl-32b" not in text


def test_refuses_when_the_planner_rejects_the_result(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The 8B fits dev's L40S (48 GB), not an L4 (22 GB): the model id is promotable, the
    # instance type is not, so only the destination's planner can catch it.
    edit(repo, "staging", "instanceType: g6e.xlarge", "instanceType: g6.xlarge")
    edit(repo, "dev", "model: Qwen/Qwen3-VL-2B-Instruct", "model: Qwen/Qwen3-VL-8B-Instruct")
    verify(repo, "dev")
    before = (repo / "Pulumi.staging.yaml").read_bytes()
    assert promote(repo, "dev", "staging") == 1
    assert (repo / "Pulumi.staging.yaml").read_bytes() == before
    err = capsys.readouterr().err
    assert "Pulumi.staging.yaml would be invalid after the promotion" in err
    assert "serving.deployments[0].maxModelLen=32768: one 32768-token sequence needs" in err


def test_an_unknown_stack_is_one_clean_message(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert promote(repo, "dev", "prd") == 1
    assert capsys.readouterr().err == (
        f"promote: {repo}/Pulumi.prd.yaml: no such stack file (stacks there: dev, prod, staging)\n"
    )


def test_an_invalid_source_is_refused_with_the_settings_problems(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit(repo, "dev", "    replicas: 1\n", "    replicas: one\n")
    before = (repo / "Pulumi.staging.yaml").read_bytes()
    assert promote(repo, "dev", "staging") == 1
    assert (repo / "Pulumi.staging.yaml").read_bytes() == before
    err = capsys.readouterr().err
    assert "refusing: the source stack is invalid" in err
    assert "gateway.replicas=one: must be an integer" in err
    assert "Traceback" not in err


def test_a_stack_file_that_is_not_yaml_is_one_clean_message(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (repo / "Pulumi.staging.yaml").write_text("config: [unclosed\n")
    assert promote(repo, "dev", "staging", "--check") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"promote: {repo}/Pulumi.staging.yaml: not valid YAML:")
