"""Rules of serving.deployments: models, parallelism, capacity plans, engine pods and extraArgs."""

from __future__ import annotations

import re
from collections.abc import Iterator

from stacks.catalog import GIB, MODELS, InstanceType, instance_type, model_spec
from stacks.parse import Problem
from stacks.planner import format_bytes, plan, plan_for, plan_request
from stacks.pod_sizing import (
    LMCACHE_LOCAL_CPU_GIB,
    default_cpu,
    default_memory_gib,
    max_cpu,
    max_memory_gib,
    pod_memory_gib,
    shm_size_bytes,
)
from stacks.rules.common import DNS_LABEL, LWS_NAME_BUDGET, deployment_path, positive, unique
from stacks.schema import DeploymentSettings, GpuNodeGroupSettings, Settings
from stacks.vllm_flags import check_extra_args, parse_version


def deployment_rules(s: Settings) -> Iterator[Problem]:
    deps = s.serving.deployments
    if not deps:
        yield Problem("serving.deployments", "define at least one deployment")
        return
    yield from unique("serving.deployments", [d.name for d in deps])
    yield from unique(
        "serving.deployments (servedModelName)", [d.served_model_name or d.name for d in deps]
    )
    default = s.serving.default_deployment
    if default is not None and default not in {d.name for d in deps}:
        yield Problem(
            "serving.defaultDeployment",
            "must name one of serving.deployments: " + ", ".join(d.name for d in deps),
            default,
        )
    for d in deps:
        yield from _deployment_rules(s, deployment_path(s, d), d)


def _deployment_rules(s: Settings, path: str, d: DeploymentSettings) -> Iterator[Problem]:
    budget = LWS_NAME_BUDGET - d.autoscaling.max_replicas // 10
    if not DNS_LABEL.match(d.name) or len(d.name) > budget:
        yield Problem(
            f"{path}.name",
            f"must be a DNS label of at most {budget} characters "
            "(LeaderWorkerSet adds group/worker suffixes)",
            d.name,
        )
    if d.name == "vllm":
        yield Problem(
            f"{path}.name",
            "must not be 'vllm': a Service of that name injects "
            "VLLM_PORT=tcp://... into pods and vLLM refuses to start; rename it",
            d.name,
        )
    if model_spec(d.model) is None:
        yield Problem(
            f"{path}.model", "unknown model; known: " + ", ".join(sorted(MODELS)), d.model
        )
    groups = {g.name for g in s.gpu_node_groups}
    if d.node_group not in groups:
        yield Problem(
            f"{path}.nodeGroup",
            "must name one of gpuNodeGroups: " + ", ".join(sorted(groups)),
            d.node_group,
        )
    yield from _plan_problems(s, path, d)
    yield from positive(f"{path}.replicas", d.replicas)
    yield from positive(f"{path}.startupBudgetMinutes", d.startup_budget_minutes)
    yield from positive(f"{path}.executeModelTimeoutSeconds", d.execute_model_timeout_seconds)
    yield from positive(f"{path}.rendezvousTimeoutSeconds", d.rendezvous_timeout_seconds)
    if d.rendezvous_timeout_seconds > d.startup_budget_minutes * 60:
        yield Problem(
            f"{path}.rendezvousTimeoutSeconds",
            f"must not exceed the startup budget ({d.startup_budget_minutes} min = "
            f"{d.startup_budget_minutes * 60} s): the leader's startup probe gives up first; "
            "lower it or raise startupBudgetMinutes",
            d.rendezvous_timeout_seconds,
        )
    if d.kv_offload_redis and not s.serving.image_includes_lmcache:
        yield Problem(
            f"{path}.kvOffloadRedis",
            "needs a vLLM image that contains LMCache; set "
            "serving.imageIncludesLmcache: true once vllmImage has it",
            True,
        )
    if d.kv_offload_redis and not s.redis.enabled:
        yield Problem(f"{path}.kvOffloadRedis", "needs redis.enabled: true", True)


def _plan_problems(s: Settings, path: str, d: DeploymentSettings) -> Iterator[Problem]:
    request = plan_request(s, d)
    if request is None:
        return
    result, problems = plan(request)
    for p in problems:
        yield Problem(f"{path}.{p.field}", p.reason, p.value)
    if (
        result is not None
        and d.shm_size_gib is not None
        and d.shm_size_gib * 2**30 < result.min_shm_bytes
    ):
        yield Problem(
            f"{path}.shmSizeGib",
            "below the planner's minimum of "
            f"{format_bytes(result.min_shm_bytes)} for this group (NCCL and vLLM's "
            "shared-memory queues fail with bus errors); raise it or leave it unset",
            d.shm_size_gib,
        )


def engine_rules(s: Settings) -> Iterator[Problem]:
    """What the vLLM engine builders (components/vllm_*.py) need to render working pods."""
    for d in s.serving.deployments:
        path = deployment_path(s, d)
        for p in check_extra_args(d.extra_args):
            yield Problem(f"{path}.extraArgs[{p.index}]", p.reason, p.token)
        uri = d.weights.s3_uri
        if uri is not None and not re.match(r"^s3://[a-z0-9.-]{3,63}/.", uri):
            yield Problem(
                f"{path}.weights.s3Uri",
                "must be s3://<bucket>/<prefix> holding the "
                "model's files (vLLM's Run:ai streamer loads from it)",
                uri,
            )
        group = next((g for g in s.gpu_node_groups if g.name == d.node_group), None)
        instance = instance_type(group.instance_type) if group else None
        if group is None or instance is None or not instance.gpus:
            continue  # reported by the node group and deployment rules
        yield from _engine_pod_problems(s, path, d, group, instance)
        if d.nodes_per_group > 1:
            yield from _exclusive_group_problems(s, path, d)
    yield from _efa_version_problems(s)


def _engine_pod_problems(
    s: Settings,
    path: str,
    d: DeploymentSettings,
    group: GpuNodeGroupSettings,
    instance: InstanceType,
) -> Iterator[Problem]:
    if d.cpu is not None and not 1 <= d.cpu <= max_cpu(instance):
        yield Problem(
            f"{path}.cpu",
            f"must be between 1 and {max_cpu(instance)}: "
            f"{instance.name} has {instance.vcpus} vCPUs and its kubelet and DaemonSets "
            f"need one (leave it unset for {default_cpu(instance)})",
            d.cpu,
        )
    ceiling = max_memory_gib(instance, group.efa)
    if d.memory_gib is not None and not 1 <= d.memory_gib <= ceiling:
        yield Problem(
            f"{path}.memoryGib",
            f"must be between 1 and {ceiling}: what "
            f"{instance.name} ({instance.memory_gib} GiB) can allocate to a pod"
            + (" after its EFA huge pages" if group.efa else "")
            + f" (leave it unset for {default_memory_gib(instance, group.efa)})",
            d.memory_gib,
        )
    p = plan_for(s, d)
    if p is None:
        return
    shm = shm_size_bytes(d, p.min_shm_bytes)
    memory = pod_memory_gib(d, instance, group.efa) * GIB
    lmcache = int(LMCACHE_LOCAL_CPU_GIB * GIB) if d.kv_offload_redis else 0
    if shm * 2 + lmcache > memory:
        key = "shmSizeGib" if d.shm_size_gib is not None else "memoryGib"
        pinned = (
            f" plus LMCache's {LMCACHE_LOCAL_CPU_GIB:g} GiB of pinned memory" if lmcache else ""
        )
        yield Problem(
            f"{path}.{key}",
            f"/dev/shm ({format_bytes(shm)}) is memory and counts "
            f"against the pod's {format_bytes(memory)} memory limit; keep it at most "
            f"half of memoryGib{pinned} so vLLM itself has room",
            d.shm_size_gib if d.shm_size_gib is not None else d.memory_gib,
        )


def _exclusive_group_problems(s: Settings, path: str, d: DeploymentSettings) -> Iterator[Problem]:
    """Multi-node groups get their node group to themselves (LWS exclusive placement)."""
    why = (
        "a multi-node group takes its node group (one EFA placement group) for itself: "
        "LeaderWorkerSet exclusive placement keeps every other engine group off it"
    )
    others = [o.name for o in s.serving.deployments if o is not d and o.node_group == d.node_group]
    if others:
        yield Problem(
            f"{path}.nodeGroup",
            f"{why}; move {', '.join(others)} to another node "
            "group or give this deployment its own",
            d.node_group,
        )
    groups = max(d.replicas, d.autoscaling.max_replicas)
    if groups > 1:
        key = "autoscaling.maxReplicas" if d.autoscaling.max_replicas > 1 else "replicas"
        yield Problem(
            f"{path}.{key}",
            f"{why}, so it runs one group; use 1 (add another node "
            "group and deployment to serve more groups)",
            groups,
        )


def _efa_version_problems(s: Settings) -> Iterator[Problem]:
    efa_groups = {g.name for g in s.gpu_node_groups if g.efa}
    users = [d.name for d in s.serving.deployments if d.node_group in efa_groups]
    if not users:
        return
    serving = s.serving
    for key, value in (
        ("efaLibfabricVersion", serving.efa_libfabric_version),
        ("efaAwsOfiNcclVersion", serving.efa_aws_ofi_nccl_version),
    ):
        if value is None or parse_version(value) is None:
            reason = (
                f"required as X.Y.Z (the version inside vllmImage) while EFA node groups "
                f"serve {', '.join(users)}: it selects the FI_*/NCCL variables the engines "
                "get (docs/reference/aws-efa.md#efa-env-presets)"
            )
            if value is None:
                yield Problem(f"serving.{key}", reason)
            else:
                yield Problem(f"serving.{key}", reason, value)
