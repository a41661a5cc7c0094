"""The `vllm serve` argv and env builder: real flags only, consistent ranks, secrets by reference."""

from __future__ import annotations

import dataclasses
import json

import pytest

from components.render.vllm_command import (
    LEADER,
    WORKER,
    EngineSpec,
    Role,
    build_vllm_command,
    build_vllm_env,
    efa_env,
    engine_flags,
    expand_k8s_vars,
    resolve_env,
)
from stacks.catalog import InstanceType, instance_type
from stacks.naming import LWS_WORKER_INDEX_LABEL, leader_address
from stacks.schema import WeightsSettings
from stacks.settings import ROOT
from stacks.vllm_flags import (
    FLAG_TABLE_FILE,
    check_extra_args,
    flag_spec,
    known_vllm_flags,
    parse_version,
)
from tests.support.engines import settings_of, spec_of

# shared/ sits beside the repository, here (/work) and in CI's clone alike
REFERENCE_TSV = ROOT.parent / "shared" / "reference" / "vllm-serve-options.tsv"


WORKER_INDEX_FIELD = f"metadata.labels['{LWS_WORKER_INDEX_LABEL}']"


def flags_of(argv: list[str]) -> dict[str, str | None]:
    """--flag value pairs of an argv (None for a switch); fails on a repeated flag."""
    found: dict[str, str | None] = {}
    for i, token in enumerate(argv):
        if token.startswith("--"):
            assert token not in found, f"{token} appears twice"
            value = argv[i + 1] if i + 1 < len(argv) else None
            found[token] = None if value is None or value.startswith("--") else value
    return found


def env_of(env: list[dict]) -> dict[str, dict]:
    names = [v["name"] for v in env]
    assert len(names) == len(set(names)), f"duplicate env names: {names}"
    return {v["name"]: v for v in env}


def pod_env(spec: EngineSpec, role: Role, rank: int) -> dict[str, str]:
    """The env the kubelet gives one pod of group 0: LWS's variables first, then ours."""
    namespace = spec.serving.namespace
    injected = {
        "LWS_LEADER_ADDRESS": leader_address(spec.deployment.name, namespace),
        "LWS_GROUP_SIZE": str(spec.nodes),
    }
    fields = {"status.podIP": f"10.0.1.{10 + rank}", WORKER_INDEX_FIELD: str(rank)}
    return resolve_env(build_vllm_env(spec, role), injected, fields)


@pytest.mark.skipif(not REFERENCE_TSV.exists(), reason="shared reference not mounted")
def test_flag_table_is_the_reference_dump() -> None:
    assert FLAG_TABLE_FILE.read_bytes() == REFERENCE_TSV.read_bytes()


def test_flag_table_knows_aliases_and_dests() -> None:
    # -tp and -pp are aliases, --nnodes defaults to 1, master port 29501 (see docs/reference/vllm.md#serve-flags).
    assert flag_spec("-tp") == flag_spec("--tensor-parallel-size")
    assert flag_spec("--pipeline_parallel_size") == flag_spec("-pp")
    nnodes = flag_spec("--nnodes")
    assert nnodes is not None
    assert nnodes.dest == "nnodes"
    assert nnodes.default == "1"
    port = flag_spec("--master-port")
    assert port is not None
    assert port.default == "29501"
    assert flag_spec("--limit-mm-per-prompt.video") == flag_spec("--limit-mm-per-prompt")
    # rejected by 0.33's parser (docs/reference/vllm.md#removed-flags)
    for removed in ("--worker-use-ray", "--disable-mm-preprocessor-cache", "--task", "--device"):
        assert removed not in known_vllm_flags()
    # the contract counts 320 options
    assert len({spec.dest for spec in (flag_spec(f) for f in known_vllm_flags()) if spec}) == 320


def _every_command() -> list[list[str]]:
    """Commands for every stack's deployments, both roles, plus the optional-flag variants."""
    commands = []
    for stack in ("dev", "staging", "prod"):
        for d in settings_of(stack).serving.deployments:
            commands.append(build_vllm_command(d, LEADER))
            variant = dataclasses.replace(
                d,
                weights=WeightsSettings(s3_uri="s3://weights/qwen"),
                expert_parallel=True,
                kv_offload_redis=True,
            )
            commands.append(build_vllm_command(variant, LEADER))
            if d.nodes_per_group > 1:
                commands.append(build_vllm_command(d, WORKER))
    return commands


def test_every_flag_the_builder_can_emit_is_a_real_vllm_033_flag() -> None:
    emitted = {token for argv in _every_command() for token in argv if token.startswith("-")}
    assert {
        "--headless",
        "--load-format",
        "--enable-expert-parallel",
        "--nnodes",
        "--kv-transfer-config",
    } <= emitted
    unknown = emitted - known_vllm_flags()
    assert not unknown, f"not in {FLAG_TABLE_FILE.name}: {sorted(unknown)}"


def test_builder_flags_are_the_ones_extra_args_may_not_repeat() -> None:
    for argv in _every_command():
        flags = [t for t in argv if t.startswith("-")]
        problems = check_extra_args(flags)
        assert [p.token for p in problems] == flags


def test_prod_235b_leader_command() -> None:
    d = settings_of("prod").deployment("qwen3-vl-235b")
    argv = build_vllm_command(d, LEADER)
    assert argv[:3] == ["vllm", "serve", "Qwen/Qwen3-VL-235B-A22B-Instruct"]
    flags = flags_of(argv)
    assert flags["--revision"] == "0" * 40
    assert flags["--served-model-name"] == "qwen3-vl-235b"
    assert flags["--tensor-parallel-size"] == "8"
    assert flags["--pipeline-parallel-size"] == "2"
    assert flags["--nnodes"] == "2"
    assert flags["--node-rank"] == "0"
    assert flags["--master-addr"] == "$(MASTER_ADDR)"
    assert flags["--master-port"] == "29501"
    assert flags["--port"] == "8000"
    assert flags["--distributed-executor-backend"] == "mp"
    assert flags["--distributed-timeout-seconds"] == str(90 * 60)
    assert flags["--max-model-len"] == "131072"
    assert flags["--mm-encoder-tp-mode"] == "data"
    assert "--enable-expert-parallel" in flags
    assert flags["--shutdown-timeout"] == "45"
    assert flags["--gpu-memory-utilization"] == "0.9"
    assert flags["--mm-processor-cache-gb"] == "4"
    assert json.loads(flags["--limit-mm-per-prompt"] or "") == {"image": 4, "video": 0}
    assert flags["--disable-access-log-for-endpoints"] == "/health,/metrics"
    assert "--headless" not in flags
    assert "--api-key" not in flags  # the key comes from VLLM_API_KEY


def test_workers_run_the_same_engine_flags_headless_with_their_rank() -> None:
    d = settings_of("staging").deployment("qwen3-vl-32b")
    leader, worker = build_vllm_command(d, LEADER), build_vllm_command(d, WORKER)
    assert worker[-1] == "--headless"
    lf, wf = flags_of(leader), flags_of(worker)
    assert lf["--node-rank"] == "0"
    assert wf["--node-rank"] == "$(NODE_RANK)"
    del lf["--node-rank"], wf["--node-rank"], wf["--headless"]
    assert lf == wf
    assert leader[:3] == worker[:3]


def test_concrete_rendering_for_the_rehearsal() -> None:
    d = settings_of("staging").deployment("qwen3-vl-32b")
    argv = build_vllm_command(d, WORKER, rank=1, master_addr="10.0.0.5")
    flags = flags_of(argv)
    assert flags["--node-rank"] == "1"
    assert flags["--master-addr"] == "10.0.0.5"
    assert not any("$(" in token for token in argv)
    leader = flags_of(build_vllm_command(d, LEADER, rank=0, master_addr="10.0.0.5"))
    assert leader["--node-rank"] == "0"
    assert leader["--master-addr"] == "10.0.0.5"


@pytest.mark.parametrize(
    ("stack", "deployment"), [("staging", "qwen3-vl-32b"), ("prod", "qwen3-vl-235b")]
)
def test_kubelet_expansion_gives_each_rank_the_concrete_command(
    stack: str, deployment: str
) -> None:
    spec = spec_of(stack, deployment)
    address = leader_address(deployment, spec.serving.namespace)
    assert address == f"{deployment}-0.{deployment}.qwen-vl"
    for rank in range(spec.nodes):
        role = LEADER if rank == 0 else WORKER
        env = pod_env(spec, role, rank)
        assert env["MASTER_ADDR"] == address
        assert env["NODE_RANK"] == str(rank)
        assert env["MASTER_PORT"] == "29501"
        assert env["WORLD_SIZE"] == str(spec.instance.gpus * spec.nodes)
        expanded = [expand_k8s_vars(t, env) for t in build_vllm_command(spec.deployment, role)]
        assert expanded == build_vllm_command(spec.deployment, role, rank=rank, master_addr=address)


def test_single_node_has_no_multi_node_flags() -> None:
    d = settings_of("dev").deployment("qwen3-vl-2b")
    flags = flags_of(build_vllm_command(d))
    for multi in (
        "--nnodes",
        "--node-rank",
        "--master-addr",
        "--master-port",
        "--headless",
        "--distributed-executor-backend",
        "--distributed-timeout-seconds",
    ):
        assert multi not in flags
    assert flags["--tensor-parallel-size"] == "1"
    with pytest.raises(ValueError, match="no worker pods"):
        build_vllm_command(d, WORKER)


def test_ranks_outside_the_group_are_refused() -> None:
    d = settings_of("prod").deployment("qwen3-vl-235b")
    with pytest.raises(ValueError, match=r"1\.\.1"):
        build_vllm_command(d, WORKER, rank=2)
    with pytest.raises(ValueError, match="rank 0"):
        build_vllm_command(d, LEADER, rank=1)


def test_s3_weights_stream_with_runai_and_no_hub_revision() -> None:
    d = settings_of("dev").deployment("qwen3-vl-2b")
    s3 = dataclasses.replace(d, weights=WeightsSettings(s3_uri="s3://models/qwen3-vl-2b/"))
    argv = build_vllm_command(s3)
    assert argv[2] == "s3://models/qwen3-vl-2b/"
    flags = flags_of(argv)
    assert flags["--load-format"] == "runai_streamer"
    assert "--revision" not in flags
    assert "--load-format" not in flags_of(build_vllm_command(d))


def test_extra_args_come_last_on_every_rank() -> None:
    d = settings_of("staging").deployment("qwen3-vl-32b")
    extra = ("--async-scheduling", "--max-num-seqs", "128")
    d = dataclasses.replace(d, extra_args=extra)
    assert tuple(build_vllm_command(d, LEADER)[-3:]) == extra
    assert tuple(build_vllm_command(d, WORKER)[-3:]) == extra
    assert engine_flags(d) == engine_flags(dataclasses.replace(d, extra_args=()))


def test_extra_args_unknown_flag_suggests_the_closest_real_one() -> None:
    [problem] = check_extra_args(["--max-num-seq", "64"])
    assert problem.index == 0
    assert "did you mean --max-num-seqs?" in problem.reason


def test_extra_args_removed_flag_names_its_replacement() -> None:
    [problem] = check_extra_args(["--disable-mm-preprocessor-cache"])
    assert "mmProcessorCacheGb: 0" in problem.reason


@pytest.mark.parametrize(
    ("token", "owner"),
    [
        ("--tensor-parallel-size", "tensorParallel"),
        ("-tp", "tensorParallel"),
        ("--max_model_len=4096", "maxModelLen"),
        ("--limit-mm-per-prompt.video", "limitMmPerPrompt"),
        ("--headless", "nodesPerGroup"),
        ("--disable-expert-parallel", "expertParallel"),
        ("--kv_transfer_config", "kvOffloadRedis"),
    ],
)
def test_extra_args_may_not_repeat_builder_flags(token: str, owner: str) -> None:
    [problem] = check_extra_args([token, "1"])
    assert "set by the engine builder" in problem.reason
    assert owner in problem.reason


def test_extra_args_may_not_carry_an_api_key() -> None:
    [problem] = check_extra_args(["--api-key", "hunter2"])
    assert "never go on a command line" in problem.reason
    assert "VLLM_API_KEY" in problem.reason


def test_extra_args_real_flags_and_values_pass() -> None:
    args = [
        "--async-scheduling",
        "--max-num-seqs",
        "128",
        "--enable-prefix-caching",
        "--override-generation-config",
        '{"temperature": 0.5}',
        "--seed=7",
        "--max-num-batched-tokens",
        "-1",
    ]
    assert check_extra_args(args) == []
    [problem] = check_extra_args(["128", "--max-num-seqs"])
    assert problem.index == 0
    assert "expected a flag" in problem.reason


def test_env_of_the_multi_node_leader_and_worker() -> None:
    spec = spec_of("prod", "qwen3-vl-235b")
    leader, worker = env_of(build_vllm_env(spec, LEADER)), env_of(build_vllm_env(spec, WORKER))
    assert leader["NODE_RANK"] == {"name": "NODE_RANK", "value": "0"}
    assert worker["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == WORKER_INDEX_FIELD
    for env in (leader, worker):
        assert env["MASTER_ADDR"]["value"] == "$(LWS_LEADER_ADDRESS)"
        assert env["WORLD_SIZE"]["value"] == "16"  # 8 H100 x 2 nodes
        assert env["VLLM_HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env["NCCL_SOCKET_IFNAME"]["value"] == "eth0"
        assert env["GLOO_SOCKET_IFNAME"]["value"] == "eth0"
        assert env["FI_EFA_USE_HUGE_PAGE"]["value"] == "0"
        assert "FI_PROVIDER" not in env  # libfabric 2.1.0 / aws-ofi-nccl 1.16.0: modern preset
        assert env["HF_HOME"]["value"] == "/cache/huggingface"
        assert env["VLLM_ENGINE_READY_TIMEOUT_S"]["value"] == str(90 * 60)
        assert env["OMP_NUM_THREADS"]["value"] == "1"
    names = [v["name"] for v in build_vllm_env(spec, LEADER)]
    assert names.index("MASTER_ADDR") < names.index("NODE_RANK")


def test_single_node_env_states_loopback_rendezvous() -> None:
    spec = spec_of("dev", "qwen3-vl-2b")
    env = env_of(build_vllm_env(spec))
    assert env["MASTER_ADDR"]["value"] == "127.0.0.1"
    assert env["NODE_RANK"]["value"] == "0"
    assert env["WORLD_SIZE"]["value"] == "1"
    assert not any(name.startswith("FI_") for name in env)


def test_secrets_are_referenced_never_literal() -> None:
    spec = dataclasses.replace(spec_of("staging", "qwen3-vl-32b"), hf_token=True)
    env = env_of(build_vllm_env(spec, WORKER))
    for key in ("VLLM_API_KEY", "HF_TOKEN"):
        assert "value" not in env[key]
        assert env[key]["valueFrom"] == {
            "secretKeyRef": {"name": "vllm-engine-qwen3-vl-32b", "key": key}
        }
    without = env_of(build_vllm_env(dataclasses.replace(spec, hf_token=False)))
    assert "HF_TOKEN" not in without
    assert "VLLM_API_KEY" in without


def test_kv_offload_redis_wires_lmcache_into_every_rank() -> None:
    spec = spec_of("staging", "qwen3-vl-32b")
    spec = dataclasses.replace(
        spec, deployment=dataclasses.replace(spec.deployment, kv_offload_redis=True)
    )
    ranks: list[tuple[Role, int]] = [(LEADER, 0), (WORKER, 1)]
    for role, rank in ranks:
        flags = flags_of(build_vllm_command(spec.deployment, role))
        # the LMCache connector as vLLM names it (docs/reference/vllm.md#kv-transfer, docs/reference/peers.md#lmcache-settings)
        assert json.loads(flags["--kv-transfer-config"] or "") == {
            "kv_connector": "LMCacheConnectorV1",
            "kv_role": "kv_both",
        }
        env = env_of(build_vllm_env(spec, role))
        assert env["LMCACHE_REDIS_PASSWORD"]["valueFrom"] == {
            "secretKeyRef": {"name": "redis-auth", "key": "password"}
        }
        # what the kubelet hands LMCache once the Secret's value is in the env
        resolved = resolve_env(
            build_vllm_env(spec, role),
            {"LWS_LEADER_ADDRESS": "qwen3-vl-32b-0.qwen3-vl-32b.qwen-vl"},
            {"status.podIP": "10.0.1.10", WORKER_INDEX_FIELD: str(rank)},
            secrets={("redis-auth", "password"): "Pw1"},
        )
        assert resolved["LMCACHE_REMOTE_URL"] == (
            "redis://app:Pw1@redis.qwen-vl.svc.cluster.local:6379"
        )
    plain = spec_of("staging", "qwen3-vl-32b")
    assert "--kv-transfer-config" not in build_vllm_command(plain.deployment)
    assert not any(name.startswith("LMCACHE_") for name in env_of(build_vllm_env(plain)))


def _instance(name: str) -> InstanceType:
    found = instance_type(name)
    assert found is not None
    return found


@pytest.mark.parametrize(
    ("libfabric", "ofi_nccl", "instance", "expected"),
    [
        ("1.18.0", "1.7.0", "p5.48xlarge", {"FI_EFA_USE_HUGE_PAGE": "0"}),
        ("2.1.0", "1.16.0", "g6e.24xlarge", {"FI_EFA_USE_HUGE_PAGE": "0"}),
        (
            "1.17.1",
            "1.7.0",
            "p5.48xlarge",
            {"FI_EFA_USE_HUGE_PAGE": "0", "FI_EFA_USE_DEVICE_RDMA": "1"},
        ),
        (
            "1.18.0",
            "1.6.0",
            "p4d.24xlarge",
            {"FI_EFA_USE_HUGE_PAGE": "0", "FI_EFA_USE_DEVICE_RDMA": "1"},
        ),
        (
            "1.16.0",
            "1.5.0",
            "p4d.24xlarge",
            {
                "FI_EFA_USE_HUGE_PAGE": "0",
                "FI_EFA_USE_DEVICE_RDMA": "1",
                "FI_PROVIDER": "efa",
                "NCCL_PROTO": "simple",
            },
        ),
        ("1.16.0", "1.5.0", "g6e.48xlarge", {"FI_EFA_USE_HUGE_PAGE": "0"}),
    ],
)
def test_efa_variables_follow_the_library_versions(
    libfabric: str, ofi_nccl: str, instance: str, expected: dict[str, str]
) -> None:
    serving = dataclasses.replace(
        settings_of("prod").serving,
        efa_libfabric_version=libfabric,
        efa_aws_ofi_nccl_version=ofi_nccl,
    )
    assert efa_env(serving, _instance(instance)) == expected


def test_shm_memcpy_hint_only_for_multi_gpu_g5_g6() -> None:
    spec = spec_of("dev", "qwen3-vl-2b")
    g6 = dataclasses.replace(spec, instance=_instance("g6.12xlarge"))
    assert env_of(build_vllm_env(g6))["NCCL_SHM_USE_CUDA_MEMCPY"]["value"] == "1"
    assert "NCCL_SHM_USE_CUDA_MEMCPY" not in env_of(build_vllm_env(spec))
    g6e = dataclasses.replace(spec, instance=_instance("g6e.48xlarge"))
    assert "NCCL_SHM_USE_CUDA_MEMCPY" not in env_of(build_vllm_env(g6e))


def test_parse_version() -> None:
    assert parse_version("1.16.0") == (1, 16, 0)
    assert parse_version("2.1") == (2, 1)
    assert parse_version("v1.2.3") is None
    assert parse_version("") is None


def test_expand_k8s_vars_follows_kubelet_rules() -> None:
    env = {"A": "x", "B": "$(A)"}
    assert expand_k8s_vars("--a=$(A)", env) == "--a=x"
    assert expand_k8s_vars("$$(A)", env) == "$(A)"  # escaped
    assert expand_k8s_vars("$(MISSING)", env) == "$(MISSING)"  # undefined stays literal
