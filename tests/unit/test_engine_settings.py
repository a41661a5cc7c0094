"""Bad engine settings are refused with the key path, the value and the fix."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from stacks.parse import SettingsError
from stacks.settings import ROOT, build

NS = "qwen-vl-serving:"
Config = dict[str, Any]
Mutation = Callable[[Config], None]


def config_of(stack: str) -> Config:
    return yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]


def deployment(config: Config, i: int) -> dict[str, Any]:
    return config[NS + "serving"]["deployments"][i]


def message(stack: str, mutate: Mutation) -> str:
    config = copy.deepcopy(config_of(stack))
    mutate(config)
    with pytest.raises(SettingsError) as err:
        build("test", stack, config)
    return str(err.value)


def loads(stack: str, mutate: Mutation) -> None:
    config = copy.deepcopy(config_of(stack))
    mutate(config)
    build("test", stack, config)


def on_deployment(i: int, **values: Any) -> Mutation:
    return lambda config: deployment(config, i).update(values)


def on_serving(**values: Any) -> Mutation:
    return lambda config: config[NS + "serving"].update(values)


def on_group(i: int, **values: Any) -> Mutation:
    return lambda config: config[NS + "gpuNodeGroups"][i].update(values)


def without_serving_key(key: str) -> Mutation:
    return lambda config: config[NS + "serving"].pop(key)


TAG_ONLY = "public.ecr.aws/deep-learning-containers/vllm:0.33.0-gpu-py312-cu130-ubuntu22.04-ec2"

# (id, stack, mutation, the "key=value" the message must name, words of the reason)
CASES: list[tuple[str, str, Mutation, str, str]] = [
    (
        "tp-times-pp-not-the-group",
        "staging",
        on_deployment(1, pipelineParallel=1),
        "serving.deployments[1].pipelineParallel=1",
        "tensorParallel x pipelineParallel = 4 x 1 = 4 must equal the 8 GPUs of the group",
    ),
    (
        "multi-node-on-non-efa-in-prod",
        "prod",
        on_group(1, efa=False),
        "serving.deployments[1].nodeGroup=h100-efa",
        "needs an EFA node group; h100-efa has efa: false",
    ),
    (
        "shm-below-planner-minimum",
        "prod",
        on_deployment(1, shmSizeGib=4),
        "serving.deployments[1].shmSizeGib=4",
        "below the planner's minimum of 16.0 GiB",
    ),
    (
        "tag-only-image-in-prod",
        "prod",
        on_serving(vllmImage=TAG_ONLY),
        f"serving.vllmImage={TAG_ONLY}",
        "prod images must be pinned by digest",
    ),
    (
        "unknown-extra-flag",
        "dev",
        on_deployment(0, extraArgs=["--max-num-seq", "64"]),
        "serving.deployments[0].extraArgs[0]=--max-num-seq",
        "not a `vllm serve` flag of vLLM 0.33; did you mean --max-num-seqs?",
    ),
    (
        "removed-extra-flag",
        "dev",
        on_deployment(0, extraArgs=["--disable-mm-preprocessor-cache"]),
        "serving.deployments[0].extraArgs[0]=--disable-mm-preprocessor-cache",
        "replaced by mmProcessorCacheGb: 0",
    ),
    (
        "extra-flag-owned-by-builder",
        "staging",
        on_deployment(1, extraArgs=["--async-scheduling", "--tensor-parallel-size", "8"]),
        "serving.deployments[1].extraArgs[1]=--tensor-parallel-size",
        "set by the engine builder from tensorParallel; set that instead",
    ),
    (
        "extra-flag-alias-owned",
        "prod",
        on_deployment(1, extraArgs=["-tp", "16"]),
        "serving.deployments[1].extraArgs[0]=-tp",
        "from tensorParallel",
    ),
    (
        "extra-flag-underscore-owned",
        "dev",
        on_deployment(0, extraArgs=["--max_model_len=4096"]),
        "serving.deployments[0].extraArgs[0]=--max_model_len=4096",
        "from maxModelLen",
    ),
    (
        "extra-kv-transfer-config-owned",
        "dev",
        on_deployment(0, extraArgs=["--kv-transfer-config", '{"kv_connector":"NixlConnector"}']),
        "serving.deployments[0].extraArgs[0]=--kv-transfer-config",
        "set by the engine builder from kvOffloadRedis",
    ),
    (
        "extra-api-key",
        "dev",
        on_deployment(0, extraArgs=["--api-key", "hunter2"]),
        "serving.deployments[0].extraArgs[0]=--api-key",
        "keys never go on a command line",
    ),
    (
        "extra-value-without-flag",
        "dev",
        on_deployment(0, extraArgs=["128"]),
        "serving.deployments[0].extraArgs[0]=128",
        "expected a flag (--name) first",
    ),
    (
        "efa-libfabric-version-missing",
        "staging",
        without_serving_key("efaLibfabricVersion"),
        "serving.efaLibfabricVersion",
        "required as X.Y.Z (the version inside vllmImage) while EFA node groups serve qwen3-vl-32b",
    ),
    (
        "efa-ofi-nccl-version-garbled",
        "prod",
        on_serving(efaAwsOfiNcclVersion="v1.16"),
        "serving.efaAwsOfiNcclVersion=v1.16",
        "required as X.Y.Z",
    ),
    (
        "multi-node-group-replicas",
        "staging",
        lambda c: (
            deployment(c, 1)["autoscaling"]
            if "autoscaling" in deployment(c, 1)
            else deployment(c, 1).setdefault("autoscaling", {})
        ).update(maxReplicas=2),
        "serving.deployments[1].autoscaling.maxReplicas=2",
        "takes its node group (one EFA placement group) for itself",
    ),
    (
        "multi-node-group-shared",
        "prod",
        on_deployment(0, nodeGroup="h100-efa"),
        "serving.deployments[1].nodeGroup=h100-efa",
        "; move qwen3-vl-2b to another node group",
    ),
    (
        "cpu-above-the-node",
        "dev",
        on_deployment(0, cpu=4),
        "serving.deployments[0].cpu=4",
        "must be between 1 and 3: g6e.xlarge has 4 vCPUs",
    ),
    (
        "memory-above-the-node",
        "staging",
        on_deployment(1, memoryGib=760),
        "serving.deployments[1].memoryGib=760",
        "must be between 1 and 755: what g6e.24xlarge (768 GiB) can allocate to a pod after its "
        "EFA huge pages",
    ),
    (
        "shm-eats-the-memory-limit",
        "dev",
        on_deployment(0, shmSizeGib=20),
        "serving.deployments[0].shmSizeGib=20",
        "/dev/shm (20.0 GiB) is memory and counts against the pod's 28.0 GiB memory limit",
    ),
    (
        "memory-too-small-for-shm",
        "prod",
        on_deployment(1, memoryGib=24),
        "serving.deployments[1].memoryGib=24",
        "against the pod's 24.0 GiB memory limit",
    ),
    (
        "s3-uri-not-s3",
        "dev",
        on_deployment(0, weights={"s3Uri": "my-bucket/qwen"}),
        "serving.deployments[0].weights.s3Uri=my-bucket/qwen",
        "must be s3://<bucket>/<prefix>",
    ),
    (
        "rendezvous-outlasts-the-startup-budget",
        "staging",
        on_deployment(1, rendezvousTimeoutSeconds=2701),
        "serving.deployments[1].rendezvousTimeoutSeconds=2701",
        "must not exceed the startup budget (45 min = 2700 s)",
    ),
    (
        "execute-model-timeout-zero",
        "dev",
        on_deployment(0, executeModelTimeoutSeconds=0),
        "serving.deployments[0].executeModelTimeoutSeconds=0",
        "must be greater than 0",
    ),
]


@pytest.mark.parametrize(
    ("stack", "mutate", "key", "reason"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_engine_setting_is_named_with_its_fix(
    stack: str, mutate: Mutation, key: str, reason: str
) -> None:
    text = message(stack, mutate)
    line = next((ln for ln in text.splitlines() if f"- {key}:" in ln), None)
    assert line is not None, f"no problem for {key} in:\n{text}"
    assert reason in line, line


def test_real_extra_flags_and_s3_weights_load() -> None:
    loads(
        "dev",
        on_deployment(
            0,
            extraArgs=[
                "--async-scheduling",
                "--max-num-seqs",
                "128",
                "--enable-prefix-caching",
                "--seed=7",
            ],
            weights={"s3Uri": "s3://models-bucket/qwen3-vl-2b/"},
        ),
    )


def test_efa_versions_are_only_required_with_an_efa_group() -> None:
    def strip(config: Config) -> None:
        config[NS + "serving"].pop("efaLibfabricVersion")
        config[NS + "serving"].pop("efaAwsOfiNcclVersion")

    loads("dev", strip)  # dev has no EFA group


def test_explicit_cpu_and_memory_within_the_node_load() -> None:
    loads("prod", on_deployment(1, cpu=180, memoryGib=1500, shmSizeGib=32))
