"""`vllm serve` command lines and environment for one engine pod (pure: no Pulumi).

vLLM 0.33 serves one model across several nodes with its own multiprocessing backend
(docs/reference/vllm.md#multi-node-mp): every node runs the same `vllm serve` with the same
engine flags plus `--nnodes N --node-rank R --master-addr LEADER --master-port P`, and every
rank except 0 adds `--headless` (no HTTP server). No Ray, and vLLM reads none of the MASTER_ADDR / RANK /
WORLD_SIZE variables torchrun-style recipes set; those are still exported, with the values
the flags carry, for the humans and tools that read them.

Inside a LeaderWorkerSet pod the rank and the leader address are only known at run time, so
the pod's argv references them as Kubernetes `$(VAR)` expansions of its own env; the offline
rehearsal asks for concrete values instead (`rank=`, `master_addr=`). `expand_k8s_vars` does
what the kubelet does, so tests can prove that both forms are the same command.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from components.render.redis_conf import LMCACHE_KV_TRANSFER_CONFIG, build_lmcache_env
from components.render.vision_flags import connector_env, consumer_flags, disaggregated
from stacks.catalog import InstanceType, instance_type
from stacks.naming import (
    ENGINE_API_KEY_ENTRY,
    HF_TOKEN_ENTRY,
    LWS_WORKER_INDEX_LABEL,
    MASTER_PORT,
    REDIS_NAME,
    REDIS_PORT,
    REDIS_SECRET,
    VLLM_HEALTH_PATH,
    VLLM_METRICS_PATH,
    VLLM_PORT,
    engine_secret_name,
    service_host,
)
from stacks.planner import Plan, plan_for
from stacks.schema import DeploymentSettings, GpuNodeGroupSettings, ServingSettings, Settings
from stacks.vllm_flags import parse_version

Role = Literal["leader", "worker"]
LEADER: Final[Role] = "leader"
WORKER: Final[Role] = "worker"

VLLM_EXECUTABLE: Final = "vllm"

# Where the weights cache is mounted in the container; HF_HOME and vLLM's compile cache
# live under it so both survive pod restarts (docs/reference/peers.md#cold-start).
CACHE_MOUNT_PATH: Final = "/cache"
HF_HOME_PATH: Final = f"{CACHE_MOUNT_PATH}/huggingface"
VLLM_CACHE_PATH: Final = f"{CACHE_MOUNT_PATH}/vllm"

# The pod's only interface on the VPC CNI. Gloo needs a concrete name, not an exclusion
# list like `^lo` (docs/reference/peers.md#wrong-network-interface); NCCL gets the same.
POD_INTERFACE: Final = "eth0"

# Single-node engines keep vLLM's own rendezvous on loopback (--master-addr's default).
LOOPBACK: Final = "127.0.0.1"

# Env names the pod's argv expands; LWS injects LWS_LEADER_ADDRESS at the front of every
# container's env, so MASTER_ADDR (defined after it) may reference it.
LWS_LEADER_ADDRESS_ENV: Final = "LWS_LEADER_ADDRESS"
MASTER_ADDR_ENV: Final = "MASTER_ADDR"
NODE_RANK_ENV: Final = "NODE_RANK"

# Requests the recipes tell vLLM to keep quiet about: probes and Prometheus scrapes.
QUIET_ENDPOINTS: Final = (VLLM_HEALTH_PATH, VLLM_METRICS_PATH)

# EFA presets (docs/reference/aws-efa.md#efa-env-presets): from libfabric 1.18.0 with aws-ofi-nccl
# 1.7.0 on, the only variable left is FI_EFA_USE_HUGE_PAGE=0 (vLLM forks its workers, and forking
# with huge-page-backed EFA buffers fails with "Cannot allocate memory").
MODERN_LIBFABRIC: Final = (1, 18, 0)
MODERN_AWS_OFI_NCCL: Final = (1, 7, 0)
# aws-ofi-nccl up to 1.5.0 needs the provider named and NCCL's simple protocol on p4/p5.
LEGACY_AWS_OFI_NCCL: Final = (1, 5, 0)
# NCCL_SHM_USE_CUDA_MEMCPY=1 roughly doubles intra-node shm bandwidth on these families.
SHM_MEMCPY_FAMILIES: Final = frozenset({"g5", "g6"})


# --- the flag table -------------------------------------------------------------------------------


# --- one deployment, as the builders see it -------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EngineSpec:
    """Everything the pure builders need about one deployment (plain data, no Outputs)."""

    deployment: DeploymentSettings
    serving: ServingSettings
    node_group: GpuNodeGroupSettings
    instance: InstanceType
    min_shm_bytes: int  # the planner's minimum /dev/shm for this group
    secret_name: str  # the Kubernetes Secret holding VLLM_API_KEY (and HF_TOKEN)
    hf_token: bool  # whether that Secret has an HF_TOKEN entry

    @property
    def nodes(self) -> int:
        return self.deployment.nodes_per_group

    @property
    def multi_node(self) -> bool:
        return self.nodes > 1

    @property
    def efa(self) -> bool:
        return self.node_group.efa

    @property
    def world_size(self) -> int:
        """vLLM's world size: every GPU of the group (TP x PP), one torch rank each."""
        return self.deployment.tensor_parallel * self.deployment.pipeline_parallel


def engine_spec(
    settings: Settings, d: DeploymentSettings, plan: Plan, secret_name: str
) -> EngineSpec:
    """The spec of a validated deployment (its plan from stacks.rules.plan_for)."""
    group = settings.node_group(d.node_group)
    instance = instance_type(group.instance_type)
    if instance is None:
        raise ValueError(f"{group.instance_type} is not in the catalog; validate settings first")
    return EngineSpec(
        deployment=d,
        serving=settings.serving,
        node_group=group,
        instance=instance,
        min_shm_bytes=plan.min_shm_bytes,
        secret_name=secret_name,
        hf_token=settings.hf_token is not None,
    )


def served_model_name(d: DeploymentSettings) -> str:
    return d.served_model_name or d.name


# --- command line ---------------------------------------------------------------------------------


def build_vllm_command(
    d: DeploymentSettings,
    role: Role = LEADER,
    *,
    rank: int | None = None,
    master_addr: str | None = None,
) -> list[str]:
    """The full argv of one engine pod.

    Without `rank`/`master_addr` a worker's rank and every pod's master address are
    `$(NODE_RANK)` / `$(MASTER_ADDR)`, which the kubelet expands from the env that
    `build_vllm_env` gives the same pod. With them, the argv is concrete (offline rehearsal).
    """
    _check_role(d, role, rank)
    argv = [VLLM_EXECUTABLE, "serve", _model_arg(d), *engine_flags(d)]
    if d.nodes_per_group > 1:
        argv += _multi_node_flags(d, role, rank, master_addr)
    return argv + list(d.extra_args)


def _check_role(d: DeploymentSettings, role: Role, rank: int | None) -> None:
    if role == WORKER and d.nodes_per_group == 1:
        raise ValueError(f"{d.name} is a single-node deployment: it has no worker pods")
    if role == LEADER and rank not in (None, 0):
        raise ValueError(f"the leader is rank 0, not {rank}")
    if role == WORKER and rank is not None and not 1 <= rank < d.nodes_per_group:
        raise ValueError(f"worker ranks of {d.name} are 1..{d.nodes_per_group - 1}, not {rank}")


def _model_arg(d: DeploymentSettings) -> str:
    return d.weights.s3_uri or d.model


def engine_flags(d: DeploymentSettings) -> list[str]:
    """The flags every rank of a group shares (vLLM requires identical engine config)."""
    flags: list[str] = []
    if d.weights.s3_uri is None:
        # A Hub revision pins the weights; an S3 prefix is pinned by what was copied there.
        flags += ["--revision", d.revision]
    flags += [
        # Aliases too: the gateway routes them unchanged, so vLLM must accept each name.
        "--served-model-name", served_model_name(d), *d.model_aliases,
        "--tensor-parallel-size", str(d.tensor_parallel),
        "--pipeline-parallel-size", str(d.pipeline_parallel),
        "--dtype", d.dtype,
        "--max-model-len", str(d.max_model_len),
        "--gpu-memory-utilization", _number(d.gpu_memory_utilization),
        "--kv-cache-dtype", d.kv_cache_dtype,
        "--limit-mm-per-prompt", json.dumps(dict(d.limit_mm_per_prompt), separators=(",", ":")),
        "--mm-encoder-tp-mode", d.mm_encoder_tp_mode,
        "--mm-processor-cache-gb", _number(d.mm_processor_cache_gb),
        # 0 (vLLM's default) aborts in-flight requests on SIGTERM
        # (docs/reference/vllm.md#shutdown-timeout)
        "--shutdown-timeout", str(d.shutdown_timeout_seconds),
        "--port", str(VLLM_PORT),
        "--disable-access-log-for-endpoints", ",".join(QUIET_ENDPOINTS),
    ]  # fmt: skip
    if d.priority_scheduling:
        # The gateway sets each request's `priority` (docs/reference/vllm.md#priority).
        flags += ["--scheduling-policy", "priority"]
    flags += image_guard_flags(d)
    if d.expert_parallel:
        flags.append("--enable-expert-parallel")
    if d.weights.s3_uri is not None:
        flags += ["--load-format", "runai_streamer"]
    if d.kv_offload_redis:
        flags += ["--kv-transfer-config", LMCACHE_KV_TRANSFER_CONFIG]
    return flags + consumer_flags(d)


def image_guard_flags(d: DeploymentSettings) -> list[str]:
    """The image guard's processor limit; the vision tier's encoders take it too, or their
    outputs would not have the token count the engines expect."""
    if d.max_image_pixels is None:
        return []
    kwargs = {"max_pixels": d.max_image_pixels}
    return ["--mm-processor-kwargs", json.dumps(kwargs, separators=(",", ":"))]


def _multi_node_flags(
    d: DeploymentSettings, role: Role, rank: int | None, master_addr: str | None
) -> list[str]:
    node_rank = "0" if role == LEADER else _worker_rank(rank)
    flags = [
        "--nnodes", str(d.nodes_per_group),
        "--node-rank", node_rank,
        "--master-addr", master_addr or f"$({MASTER_ADDR_ENV})",
        "--master-port", str(MASTER_PORT),
        # nnodes > 1 selects mp anyway; naming it fails fast if a default ever changes
        "--distributed-executor-backend", "mp",
        # NCCL's first collective waits for the slowest rank's weight load; torch's 600 s
        # default is shorter than a cold multi-node load (docs/reference/vllm.md#serve-flags)
        "--distributed-timeout-seconds", str(startup_budget_seconds(d)),
    ]  # fmt: skip
    if role == WORKER:
        flags.append("--headless")
    return flags


def rendezvous_target(argv: Sequence[str]) -> tuple[str, str]:
    """(--master-addr, --master-port) of a multi-node argv, as written (maybe `$(MASTER_ADDR)`)."""

    def value(flag: str) -> str:
        if flag not in argv[:-1]:
            raise ValueError(f"{flag} is not in this command line (a single-node engine?)")
        return argv[list(argv).index(flag) + 1]

    return value("--master-addr"), value("--master-port")


def _worker_rank(rank: int | None) -> str:
    return f"$({NODE_RANK_ENV})" if rank is None else str(rank)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def startup_budget_seconds(d: DeploymentSettings) -> int:
    return d.startup_budget_minutes * 60


# --- environment ----------------------------------------------------------------------------------

EnvVar = dict[str, Any]


def build_vllm_env(spec: EngineSpec, role: Role = LEADER) -> list[EnvVar]:
    """The env of one engine pod, as Kubernetes EnvVar dicts (secrets by reference only)."""
    d = spec.deployment
    env = [
        *_distributed_env(spec, role),
        _value("VLLM_HOST_IP", field="status.podIP"),
        _value("NCCL_SOCKET_IFNAME", POD_INTERFACE),
        _value("GLOO_SOCKET_IFNAME", POD_INTERFACE),
    ]
    if spec.efa:
        env += [_value(k, v) for k, v in efa_env(spec.serving, spec.instance).items()]
    if spec.instance.name.split(".")[0] in SHM_MEMCPY_FAMILIES and spec.instance.gpus > 1:
        env.append(_value("NCCL_SHM_USE_CUDA_MEMCPY", "1"))
    env += [
        _value("HF_HOME", HF_HOME_PATH),
        _value("VLLM_CACHE_ROOT", VLLM_CACHE_PATH),
        # vLLM's 600 s engine start budget is shorter than a big load; match the startup probe
        _value("VLLM_ENGINE_READY_TIMEOUT_S", str(startup_budget_seconds(d))),
        # A model step that outlasts this fails the engine and the leader's server exits: the
        # way out for a hung rank under load; vLLM's default is 300 s
        # (docs/engines.md#failure-modes, docs/reference/vllm.md#execute-model-timeout).
        _value("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", str(d.execute_model_timeout_seconds)),
        # vLLM recipes for Qwen3-VL (docs/reference/qwen3-vl.md#serving-guidance): one OpenMP thread
        # per process
        _value("OMP_NUM_THREADS", "1"),
        _secret(ENGINE_API_KEY_ENTRY, spec.secret_name),
    ]
    if spec.hf_token:
        env.append(_secret(HF_TOKEN_ENTRY, spec.secret_name))
    if disaggregated(d):
        env.append(connector_env())  # our EC connector module (docs/vision.md#connector)
    if d.kv_offload_redis:
        # every rank: LMCache's connector stores and loads KV inside each GPU worker
        redis_host = service_host(REDIS_NAME, spec.serving.namespace)
        env += build_lmcache_env(redis_host, REDIS_PORT, REDIS_SECRET)
    return env


def _distributed_env(spec: EngineSpec, role: Role) -> list[EnvVar]:
    """MASTER_ADDR/PORT, NODE_RANK, WORLD_SIZE with the values the vLLM flags carry."""
    if not spec.multi_node:
        master: EnvVar = _value(MASTER_ADDR_ENV, LOOPBACK)
        rank: EnvVar = _value(NODE_RANK_ENV, "0")
    else:
        master = _value(MASTER_ADDR_ENV, f"$({LWS_LEADER_ADDRESS_ENV})")
        # The worker-index label is set by every LWS release; LWS_WORKER_INDEX only by newer ones.
        rank = (
            _value(NODE_RANK_ENV, "0")
            if role == LEADER
            else _value(NODE_RANK_ENV, field=f"metadata.labels['{LWS_WORKER_INDEX_LABEL}']")
        )
    return [
        master,
        _value("MASTER_PORT", str(MASTER_PORT)),
        rank,
        _value("WORLD_SIZE", str(spec.world_size)),
    ]


def efa_env(serving: ServingSettings, instance: InstanceType) -> dict[str, str]:
    """libfabric / aws-ofi-nccl variables for the library versions inside the image.

    Which variable each version needs: docs/reference/aws-efa.md#efa-env-presets.
    """
    libfabric = parse_version(serving.efa_libfabric_version or "")
    ofi_nccl = parse_version(serving.efa_aws_ofi_nccl_version or "")
    if libfabric is None or ofi_nccl is None:
        raise ValueError("EFA groups need serving.efaLibfabricVersion and efaAwsOfiNcclVersion")
    env = {"FI_EFA_USE_HUGE_PAGE": "0"}
    if libfabric >= MODERN_LIBFABRIC and ofi_nccl >= MODERN_AWS_OFI_NCCL:
        return env
    p_family = instance.name.startswith("p")
    if p_family:
        # needed below the modern preset; GPUDirect RDMA exists on the P families only
        env["FI_EFA_USE_DEVICE_RDMA"] = "1"
    if p_family and ofi_nccl <= LEGACY_AWS_OFI_NCCL:
        env |= {"FI_PROVIDER": "efa", "NCCL_PROTO": "simple"}
    return env


def _value(name: str, value: str | None = None, *, field: str | None = None) -> EnvVar:
    if field is not None:
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field}}}
    return {"name": name, "value": value}


def _secret(key: str, secret_name: str) -> EnvVar:
    return {"name": key, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}}


# --- what the kubelet does with $(VAR) ------------------------------------------------------------

_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand_k8s_vars(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined names are replaced, `$$` escapes, others stay."""

    def replace(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _REFERENCE.sub(replace, text)


def resolve_env(
    env: Sequence[EnvVar],
    injected: Mapping[str, str],
    fields: Mapping[str, str],
    secrets: Mapping[tuple[str, str], str] | None = None,
) -> dict[str, str]:
    """The env a container sees: `injected` (LWS) first, then each var in order, expanded.

    `fields` answers downward-API fieldRefs (e.g. status.podIP) and `secrets` secretKeyRefs
    by (Secret name, key); secret refs it does not answer stay unresolved.
    """
    resolved = dict(injected)
    for var in env:
        source = var.get("valueFrom", {})
        if "value" in var:
            resolved[var["name"]] = expand_k8s_vars(var["value"], resolved)
        elif "fieldRef" in source:
            resolved[var["name"]] = fields[source["fieldRef"]["fieldPath"]]
        elif secrets is not None and "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            if (ref["name"], ref["key"]) in secrets:
                resolved[var["name"]] = secrets[ref["name"], ref["key"]]
    return resolved


def spec_for(settings: Settings, d: DeploymentSettings) -> EngineSpec:
    """The builders' view of a deployment of validated settings (also used by the rehearsal)."""
    plan = plan_for(settings, d)
    if plan is None:
        raise ValueError(f"deployment {d.name} has no capacity plan; validate the settings first")
    return engine_spec(settings, d, plan, engine_secret_name(d.name))
