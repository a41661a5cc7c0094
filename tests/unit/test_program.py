"""The real program runs for every stack under mocks."""

import pytest

from tests.harness import run_stack

STACKS = ["dev", "staging", "prod"]


@pytest.mark.parametrize("stack", STACKS)
def test_program_exports_the_stack_identity(stack: str) -> None:
    run = run_stack(stack)
    assert run.outputs["stack"] == stack
    assert run.outputs["environment"] == stack


def test_config_mistake_under_the_engine_is_one_clean_message(tmp_path) -> None:
    import pulumi
    import yaml

    from tests.harness import ROOT

    document = yaml.safe_load((ROOT / "Pulumi.dev.yaml").read_text())
    document["config"]["qwen-vl-serving:gateway"]["replicas"] = "two"
    bad = tmp_path / "Pulumi.dev.yaml"
    bad.write_text(yaml.safe_dump(document))
    # RunError is Pulumi's "clean exit": the CLI prints the message without a traceback.
    with pytest.raises(pulumi.RunError) as err:
        run_stack("dev", bad)
    message = str(err.value)
    assert "gateway.replicas=two: must be an integer" in message
    assert message.startswith("stack dev: 1 configuration problem(s)")
