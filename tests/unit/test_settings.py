"""Settings: every stack file loads; every mistake is reported with its key path and fix."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts import check
from scripts import config_docs as docs
from stacks.parse import SettingsError
from stacks.schema import Secret
from stacks.settings import ROOT, build, load_stack_file
from tests.support.settings import NS, Config, stack_config


def problems_of(stack: str, mutate: Callable[[Config], None]) -> str:
    config = copy.deepcopy(stack_config(stack))
    mutate(config)
    with pytest.raises(SettingsError) as err:
        build("test", stack, config)
    return str(err.value)


def dep(config: Config, i: int) -> dict[str, Any]:
    return config[NS + "serving"]["deployments"][i]


def setter(*path: Any, value: Any) -> Callable[[Config], None]:
    """A mutation that sets config[ns+path[0]][path[1]]...[path[-1]] = value."""

    def mutate(config: Config) -> None:
        node: Any = config[NS + path[0]] if isinstance(path[0], str) else config
        for key in path[1:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def deleter(*path: Any) -> Callable[[Config], None]:
    def mutate(config: Config) -> None:
        node: Any = config[NS + path[0]]
        for key in path[1:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


# (id, stack, mutation, key path the message must name, words the reason must contain)
CASES: list[tuple[str, str, Callable[[Config], None], str, str]] = [
    (
        "tp-not-dividing-gpus",
        "prod",
        setter("serving", "deployments", 1, "tensorParallel", value=3),
        "serving.deployments[1].tensorParallel=3",
        "must divide the 8 GPUs of p5.48xlarge (try 1, 2, 4 or 8)",
    ),
    (
        "tp-pp-mismatch",
        "staging",
        setter("serving", "deployments", 1, "pipelineParallel", value=1),
        "serving.deployments[1]",
        "8",
    ),
    (
        "unknown-model",
        "dev",
        setter("serving", "deployments", 0, "model", value="Qwen/Qwen3-VL-7B"),
        "serving.deployments[0].model=Qwen/Qwen3-VL-7B",
        "unknown model",
    ),
    (
        "unknown-node-group",
        "dev",
        setter("serving", "deployments", 0, "nodeGroup", value="h100"),
        "serving.deployments[0].nodeGroup=h100",
        "must name one of gpuNodeGroups: l40s",
    ),
    (
        "typo-in-deployment-key",
        "dev",
        setter("serving", "deployments", 0, "tensorParalel", value=1),
        "serving.deployments[0].tensorParalel=1",
        "did you mean tensorParallel?",
    ),
    (
        "typo-top-level-key",
        "dev",
        lambda c: c.update({NS + "gatway": {}}),
        "gatway",
        "did you mean gateway?",
    ),
    (
        "string-for-int",
        "dev",
        setter("serving", "deployments", 0, "maxModelLen", value="32k"),
        "serving.deployments[0].maxModelLen=32k",
        "must be an integer",
    ),
    (
        "bool-for-int",
        "dev",
        setter("gateway", "replicas", value=True),
        "gateway.replicas=true",
        "must be an integer",
    ),
    (
        "int-for-string-revision",
        "dev",
        setter("serving", "deployments", 0, "revision", value=0),
        "serving.deployments[0].revision=0",
        "must be a string",
    ),
    (
        "bad-literal",
        "dev",
        setter("gateway", "loadBalancing", value="roundRobin"),
        "gateway.loadBalancing=roundRobin",
        "must be one of leastConn, sessionAffinity",
    ),
    (
        "list-expected",
        "dev",
        setter("network", "availabilityZones", value="us-east-1a"),
        "network.availabilityZones=us-east-1a",
        "must be a list",
    ),
    ("missing-required", "dev", deleter("cluster", "name"), "cluster.name", "required"),
    ("missing-environment", "dev", lambda c: c.pop(NS + "environment"), "environment", "required"),
    (
        "bad-environment",
        "dev",
        lambda c: c.update({NS + "environment": "production"}),
        "environment=production",
        "must be one of dev, staging, prod",
    ),
    (
        "region-in-wrong-namespace",
        "dev",
        lambda c: c.update({NS + "region": "us-east-1"}),
        "qwen-vl-serving:region",
        "set it as aws:region",
    ),
    (
        "nested-secret",
        "dev",
        setter("redis", "image", value={"secure": "v1:abc"}),
        "redis.image",
        "secrets are only accepted as top-level keys",
    ),
    (
        "one-az",
        "dev",
        setter("network", "availabilityZones", value=["us-east-1a"]),
        "network.availabilityZones",
        "at least 2 distinct AZs",
    ),
    (
        "az-of-other-region",
        "dev",
        setter("network", "availabilityZones", value=["us-east-1a", "eu-west-1b"]),
        "network.availabilityZones[1]=eu-west-1b",
        "must be a zone of us-east-1",
    ),
    (
        "bad-cidr",
        "dev",
        setter("network", "cidr", value="10.20.0.0/33"),
        "network.cidr=10.20.0.0/33",
        "IPv4 CIDR",
    ),
    (
        "existing-vpc-without-id",
        "dev",
        setter("network", "mode", value="existing"),
        "network.vpcId",
        "required when network.mode is existing",
    ),
    (
        "efa-on-type-without-efa",
        "dev",
        setter("gpuNodeGroups", 0, "efa", value=True),
        "gpuNodeGroups[0].efa=true",
        "g6e.xlarge has no EFA",
    ),
    (
        "shared-placement-without-sidecar-image",
        "staging",
        deleter("gateway", "quotaImage"),
        "gateway.quotaImage",
        "sharedSessionPlacement with 2+ replicas",
    ),
    (
        "shared-placement-ttl-too-short",
        "staging",
        setter("gateway", "sessionTtlSeconds", value=30),
        "gateway.sessionTtlSeconds=30",
        "half TTL",
    ),
    (
        "shared-placement-without-redis",
        "staging",
        setter("redis", "enabled", value=False),
        "redis.enabled",
        "share each session's engine through Redis",
    ),
    (
        "efa-without-az",
        "staging",
        deleter("gpuNodeGroups", 1, "availabilityZone"),
        "gpuNodeGroups[1].availabilityZone",
        "required with efa",
    ),
    (
        "az-outside-network",
        "staging",
        setter("gpuNodeGroups", 1, "availabilityZone", value="us-east-1f"),
        "gpuNodeGroups[1].availabilityZone=us-east-1f",
        "must be one of the network's AZs",
    ),
    (
        "min-above-max",
        "dev",
        setter("gpuNodeGroups", 0, "minSize", value=3),
        "gpuNodeGroups[0].minSize=3",
        "must not exceed maxSize=1",
    ),
    (
        "desired-outside-bounds",
        "dev",
        setter("systemNodes", "desiredSize", value=9),
        "systemNodes.desiredSize=9",
        "must lie between minSize=1 and maxSize=3",
    ),
    (
        "unknown-instance-type",
        "dev",
        setter("gpuNodeGroups", 0, "instanceType", value="g7.xlarge"),
        "gpuNodeGroups[0].instanceType=g7.xlarge",
        "unknown GPU instance type",
    ),
    (
        "gpu-type-for-system-nodes",
        "dev",
        setter("systemNodes", "instanceType", value="p5.48xlarge"),
        "systemNodes.instanceType=p5.48xlarge",
        "must be a CPU type",
    ),
    (
        "capacity-block-without-reservation",
        "dev",
        setter("gpuNodeGroups", 0, "capacityType", value="capacityBlock"),
        "gpuNodeGroups[0].capacityReservationId",
        "required when capacityType is capacityBlock",
    ),
    (
        "duplicate-group-names",
        "staging",
        setter("gpuNodeGroups", 1, "name", value="l40s"),
        "gpuNodeGroups",
        "used 2 times",
    ),
    (
        "deployment-named-vllm",
        "dev",
        setter("serving", "deployments", 0, "name", value="vllm"),
        "serving.deployments[0].name=vllm",
        "VLLM_PORT",
    ),
    (
        "deployment-name-not-dns",
        "dev",
        setter("serving", "deployments", 0, "name", value="Qwen_2B"),
        "serving.deployments[0].name=Qwen_2B",
        "DNS label",
    ),
    (
        "unknown-default-deployment",
        "staging",
        setter("serving", "defaultDeployment", value="qwen"),
        "serving.defaultDeployment=qwen",
        "must name one of serving.deployments",
    ),
    (
        "weights-do-not-fit",
        "dev",
        setter("serving", "deployments", 0, "model", value="Qwen/Qwen3-VL-235B-A22B-Instruct"),
        "serving.deployments[0]",
        "GiB",
    ),
    (
        "context-too-long",
        "dev",
        setter("serving", "deployments", 0, "maxModelLen", value=400000),
        "serving.deployments[0].maxModelLen=400000",
        "262144",
    ),
    (
        "expert-parallel-on-dense",
        "dev",
        setter("serving", "deployments", 0, "expertParallel", value=True),
        "serving.deployments[0].expertParallel=true",
        "MoE",
    ),
    (
        "shm-below-minimum",
        "staging",
        setter("serving", "deployments", 1, "shmSizeGib", value=1),
        "serving.deployments[1].shmSizeGib=1",
        "below the planner's minimum of 8.0 GiB",
    ),
    (
        "tag-only-image-in-prod",
        "prod",
        setter("serving", "vllmImage", value="vllm/vllm-openai:v0.33.0"),
        "serving.vllmImage=vllm/vllm-openai:v0.33.0",
        "pinned by digest",
    ),
    (
        "branch-revision-in-prod",
        "prod",
        setter("serving", "deployments", 0, "revision", value="main"),
        "serving.deployments[0].revision=main",
        "40-character commit sha",
    ),
    (
        "multi-node-without-efa-in-prod",
        "prod",
        setter("gpuNodeGroups", 1, "efa", value=False),
        "serving.deployments[1].nodeGroup=h100-efa",
        "needs an EFA node group",
    ),
    (
        "prod-unprotected",
        "prod",
        lambda c: c.update({NS + "protect": False}),
        "protect=false",
        "must be true in prod",
    ),
    (
        "max-below-min-replicas",
        "staging",
        setter(
            "serving", "deployments", 0, "autoscaling", value={"minReplicas": 3, "maxReplicas": 2}
        ),
        "serving.deployments[0].autoscaling.maxReplicas=2",
        "must be at least minReplicas=3",
    ),
    (
        "groups-exceed-node-group",
        "staging",
        setter("serving", "deployments", 1, "autoscaling", value={"maxReplicas": 2}),
        "gpuNodeGroups[1].maxSize=2",
        "may need 4 nodes",
    ),
    (
        "zero-replicas-without-scale-to-zero",
        "dev",
        setter("serving", "deployments", 0, "autoscaling", value={"minReplicas": 0}),
        "serving.deployments[0].autoscaling.minReplicas=0",
        "scaleToZero",
    ),
    (
        "kv-offload-without-lmcache-image",
        "dev",
        setter("serving", "deployments", 0, "kvOffloadRedis", value=True),
        "serving.deployments[0].kvOffloadRedis=true",
        "imageIncludesLmcache",
    ),
    (
        "unknown-alert-threshold",
        "dev",
        setter("monitoring", "alerts", value={"queueBacklg": 5}),
        "monitoring.alerts.queueBacklg=5",
        "did you mean queueBacklog?",
    ),
]


@pytest.mark.parametrize(
    ("stack", "mutate", "path", "reason"), [pytest.param(*case[1:], id=case[0]) for case in CASES]
)
def test_mistake_is_reported_with_key_path_and_fix(
    stack: str, mutate: Callable[[Config], None], path: str, reason: str
) -> None:
    message = problems_of(stack, mutate)
    line = next((ln for ln in message.splitlines() if f"- {path}" in ln), None)
    assert line is not None, f"no problem names {path!r}:\n{message}"
    assert reason in line, f"{reason!r} missing from {line!r}"


def test_there_are_at_least_thirty_distinct_mistakes() -> None:
    assert len({c[0] for c in CASES}) >= 30


def test_every_problem_is_collected_in_one_error() -> None:
    def three_mistakes(config: Config) -> None:
        config[NS + "gateway"]["replicas"] = "one"
        dep(config, 0)["maxModelLen"] = "32k"
        config[NS + "network"]["natGateways"] = "many"

    lines = problems_of("dev", three_mistakes).splitlines()
    assert lines[0] == "test: 3 configuration problem(s):"
    assert sorted(lines[1:]) == [
        "  - gateway.replicas=one: must be an integer",
        "  - network.natGateways=many: must be one of single, perAz",
        "  - serving.deployments[0].maxModelLen=32k: must be an integer",
    ]


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_committed_stacks_are_valid_and_match_their_tier(stack: str) -> None:
    settings = load_stack_file(ROOT / f"Pulumi.{stack}.yaml")
    assert settings.stack == stack
    assert settings.environment == stack
    assert settings.protect is (stack == "prod")


def test_prod_has_a_replicated_small_model_and_a_multi_node_efa_model() -> None:
    s = load_stack_file(ROOT / "Pulumi.prod.yaml")
    small, big = s.serving.deployments
    assert (small.model, small.nodes_per_group, small.replicas) == (
        "Qwen/Qwen3-VL-2B-Instruct",
        1,
        4,
    )
    assert big.nodes_per_group == 2
    assert (big.tensor_parallel, big.pipeline_parallel) == (8, 2)
    assert s.node_group(big.node_group).efa
    assert s.node_group(big.node_group).instance_type == "p5.48xlarge"


def test_secure_values_stay_opaque(tmp_path: Path) -> None:
    config = stack_config("dev")
    config[NS + "hfToken"] = {"secure": "v1:c2VjcmV0LWNpcGhlcnRleHQ="}
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(yaml.safe_dump({"config": config}))
    settings = load_stack_file(path)
    assert isinstance(settings.hf_token, Secret)
    assert settings.hf_token.value is None
    assert "c2VjcmV0" not in repr(settings) + str(settings.hf_token)


def test_non_secret_token_is_refused() -> None:
    message = problems_of("dev", lambda c: c.update({NS + "hfToken": "hf_plaintext"}))
    assert "hfToken=hf_plaintext: must be a secret" in message


def test_check_command_prints_plan_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert check.main(["staging"]) == 0
    out = capsys.readouterr().out
    assert "qwen3-vl-32b" in out
    assert "g6e.24xlarge x 2" in out
    assert "4 x 2" in out
    assert "Pulumi.staging.yaml: valid" in out


def test_configuration_reference_matches_the_schema() -> None:
    committed = (ROOT / "docs" / "CONFIG.md").read_text()
    assert committed == docs.render(), "docs/CONFIG.md is stale: run `make docs`"


def test_configuration_reference_lists_every_key_of_every_stack() -> None:
    reference = (ROOT / "docs" / "CONFIG.md").read_text()
    for stack in ("dev", "staging", "prod"):
        for key, value in stack_config(stack).items():
            name = key.removeprefix(NS)
            assert f"| `{name}` |" in reference, name
            is_map = f"| `{name}` | map of" in reference
            for sub in value if isinstance(value, dict) and not is_map else ():
                assert f"| `{name}.{sub}` |" in reference, f"{name}.{sub}"


WRONG_VALUES = [None, "", "x", -1, 0, 10**12, 0.5, True, [], ["x"], {}, {"a": 1}]


def _leaf_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leaf_paths(v, (*prefix, k))] + [prefix]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _leaf_paths(v, (*prefix, i))] + [prefix]
    return [prefix]


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_no_value_at_any_key_reaches_a_traceback(stack: str) -> None:
    # Every key of the stack file set to values of every wrong kind: each must end in a
    # SettingsError (a message naming the key), never in another exception.
    base = stack_config(stack)
    crashes = []
    for path in filter(None, _leaf_paths(base)):
        for value in WRONG_VALUES:
            config = copy.deepcopy(base)
            node: Any = config
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
            try:
                build("fuzz", stack, config)
            except SettingsError:
                pass
            except Exception as err:  # collecting every crash is the point
                crashes.append(f"{'.'.join(map(str, path))}={value!r}: {type(err).__name__}: {err}")
    assert crashes == []


def test_a_directory_as_stack_file_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as err:
        load_stack_file(tmp_path)
    assert "file: cannot read it: Is a directory" in str(err.value)


def test_lmcache_pinned_memory_counts_against_the_engine_pod() -> None:
    def offload(config: Config, *, on: bool) -> None:
        config[NS + "serving"]["imageIncludesLmcache"] = True
        dep(config, 0).update({"memoryGib": 8, "shmSizeGib": 2, "kvOffloadRedis": on})

    # 2 x 2 GiB of /dev/shm fits in 8 GiB; adding LMCache's 5 GiB of pinned memory does not
    config = copy.deepcopy(stack_config("dev"))
    offload(config, on=False)
    build("test", "dev", config)
    message = problems_of("dev", lambda c: offload(c, on=True))
    assert "serving.deployments[0].shmSizeGib=2:" in message
    assert "plus LMCache's 5 GiB of pinned memory" in message


def test_check_fails_prod_on_placeholders_naming_the_pin_tool(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The committed prod file carries all-zero digests (written without registry access)."""
    assert check.main(["prod"]) == 1
    captured = capsys.readouterr()
    assert "not deployable" in captured.out
    placeholder_lines = [line for line in captured.err.splitlines() if "placeholder digest" in line]
    # vllm, gateway + exporter + quota sidecar, redis + exporter (webui off)
    assert len(placeholder_lines) == 6
    assert all("python -m scripts.pin --stack prod" in line for line in placeholder_lines)
