"""The real program runs for every stack under mocks."""

import pytest

from tests.support.harness import run_stack

STACKS = ["dev", "staging", "prod"]


# Outputs other tools read: scripts/loadtest.py (gateway_url, gateway_api_keys, engines),
# scripts/verify.py (kubeconfig), docs/data.md (the redis_* connection details).
CONSUMED_OUTPUTS = {
    "gateway_url",
    "gateway_api_keys",
    "engines",
    "kubeconfig",
    "redis_host",
    "redis_port",
    "redis_username",
    "redis_password",
    "redis_key_scheme",
}


@pytest.mark.parametrize("stack", STACKS)
def test_program_exports_what_the_tools_read(stack: str) -> None:
    run = run_stack(stack)
    assert set(run.outputs) >= CONSUMED_OUTPUTS
    assert run.outputs["stack"] == stack
    engines = run.outputs["engines"]
    expected = {
        "dev": {"qwen3-vl-2b"},
        "staging": {"qwen3-vl-2b", "qwen3-vl-32b"},
        "prod": {"qwen3-vl-2b", "qwen3-vl-235b"},
    }[stack]
    assert set(engines) == expected


@pytest.mark.parametrize("stack", STACKS)
def test_every_child_is_parented_and_named_after_its_component(stack: str) -> None:
    run = run_stack(stack)
    components = {r.urn: r.name for r in run.resources if not r.custom and r.urn}
    for r in run.resources:
        parent = components.get(r.parent)
        if parent is not None:
            assert r.name.startswith(parent), f"{r.type} {r.name} under component {parent}"


def test_config_mistake_under_the_engine_is_one_clean_message(tmp_path) -> None:
    import pulumi
    import yaml

    from tests.support.harness import ROOT

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
