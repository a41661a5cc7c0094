"""Cross-field validation of parsed settings. Every rule returns problems; none raises.

Rules are grouped by section so each stays short; `validate` runs them all and
the caller raises one SettingsError listing everything.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from stacks.catalog import INSTANCE_TYPES, MODELS, instance_type, model_spec
from stacks.parse import Problem
from stacks.planner import Plan, PlanRequest, format_bytes, plan
from stacks.schema import DeploymentSettings, GpuNodeGroupSettings, Settings

# A DNS-1035 label: LWS names become Service and pod host names.
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# LeaderWorkerSet names must leave room for the group and worker index suffixes
# (kubernetes-sigs/lws troubleshooting: 51 - int(replicas/10) characters).
_LWS_NAME_BUDGET = 51

# EKS needs control-plane subnets in two AZs.
MIN_AZS = 2

Rule = Callable[[Settings], Iterable[Problem]]


def deployment_path(settings: Settings, d: DeploymentSettings) -> str:
    return f"serving.deployments[{settings.serving.deployments.index(d)}]"


def plan_for(settings: Settings, d: DeploymentSettings) -> Plan | None:
    """The capacity plan of a valid deployment (None when its inputs are invalid)."""
    request = plan_request(settings, d)
    return None if request is None else plan(request)[0]


def plan_request(settings: Settings, d: DeploymentSettings) -> PlanRequest | None:
    group = next((g for g in settings.gpu_node_groups if g.name == d.node_group), None)
    model = model_spec(d.model)
    instance = instance_type(group.instance_type) if group else None
    if model is None or instance is None:
        return None
    return PlanRequest(
        model=model,
        instance=instance,
        tensor_parallel=d.tensor_parallel,
        pipeline_parallel=d.pipeline_parallel,
        nodes_per_group=d.nodes_per_group,
        max_model_len=d.max_model_len,
        gpu_memory_utilization=d.gpu_memory_utilization,
        kv_cache_dtype=d.kv_cache_dtype,
        mm_encoder_tp_mode=d.mm_encoder_tp_mode,
        expert_parallel=d.expert_parallel,
    )


def _positive(path: str, value: float) -> Iterator[Problem]:
    if value <= 0:
        yield Problem(path, "must be greater than 0", value)


def _sizes(path: str, lo: int, want: int, hi: int) -> Iterator[Problem]:
    if not lo <= want <= hi:
        yield Problem(
            f"{path}.desiredSize",
            f"must lie between minSize={lo} and maxSize={hi} (raise maxSize or lower minSize)",
            want,
        )


def _unique(path: str, names: list[str]) -> Iterator[Problem]:
    for name, count in Counter(names).items():
        if count > 1:
            yield Problem(path, f"the name {name!r} is used {count} times; names must be unique")


def network_rules(s: Settings) -> Iterator[Problem]:
    n = s.network
    if n.mode == "new":
        try:
            ipaddress.ip_network(n.cidr)
        except ValueError:
            yield Problem("network.cidr", "must be an IPv4 CIDR such as 10.0.0.0/16", n.cidr)
        if len(set(n.availability_zones)) < MIN_AZS:
            yield Problem(
                "network.availabilityZones",
                "a new VPC needs at least 2 distinct AZs (EKS requires two)",
                n.availability_zones,
            )
        yield from (
            Problem(
                f"network.availabilityZones[{i}]",
                f"must be a zone of {s.region} (e.g. {s.region}a)",
                az,
            )
            for i, az in enumerate(n.availability_zones)
            if not az.startswith(s.region)
        )
    else:
        if not n.vpc_id:
            yield Problem("network.vpcId", "required when network.mode is existing")
        if len(n.private_subnet_ids) < MIN_AZS:
            yield Problem(
                "network.privateSubnetIds",
                "give at least 2 private subnets (AZ: subnet-id) in distinct AZs",
            )


def zones(s: Settings) -> tuple[str, ...]:
    """The AZs nodes can be placed in."""
    n = s.network
    return n.availability_zones if n.mode == "new" else tuple(n.private_subnet_ids)


def node_group_rules(s: Settings) -> Iterator[Problem]:
    yield from _unique("gpuNodeGroups", [g.name for g in s.gpu_node_groups])
    if not s.gpu_node_groups:
        yield Problem("gpuNodeGroups", "define at least one GPU node group")
    sys_path = "systemNodes"
    sys_type = instance_type(s.system_nodes.instance_type)
    if sys_type is None or sys_type.gpus:
        cpu_types = sorted(n for n, t in INSTANCE_TYPES.items() if not t.gpus)
        yield Problem(
            f"{sys_path}.instanceType",
            "must be a CPU type from the catalog: " + ", ".join(cpu_types),
            s.system_nodes.instance_type,
        )
    yield from _sizes(
        sys_path, s.system_nodes.min_size, s.system_nodes.desired_size, s.system_nodes.max_size
    )
    for i, g in enumerate(s.gpu_node_groups):
        yield from _gpu_group_rules(s, f"gpuNodeGroups[{i}]", g)


def _gpu_group_rules(s: Settings, path: str, g: GpuNodeGroupSettings) -> Iterator[Problem]:
    if not _DNS_LABEL.match(g.name):
        yield Problem(f"{path}.name", "must be a lowercase DNS label (a-z, 0-9, -)", g.name)
    yield from _sizes(path, g.min_size, g.desired_size, g.max_size)
    if g.min_size > g.max_size:
        yield Problem(f"{path}.minSize", f"must not exceed maxSize={g.max_size}", g.min_size)
    t = instance_type(g.instance_type)
    if t is None or not t.gpus:
        gpu_types = ", ".join(sorted(n for n, it in INSTANCE_TYPES.items() if it.gpus))
        yield Problem(
            f"{path}.instanceType",
            f"unknown GPU instance type; known: {gpu_types}",
            g.instance_type,
        )
    elif g.efa and not t.efa_supported:
        efa_types = sorted(n for n, it in INSTANCE_TYPES.items() if it.gpus and it.efa_supported)
        yield Problem(
            f"{path}.efa",
            f"{g.instance_type} has no EFA; set efa: false or use an "
            f"EFA type ({', '.join(efa_types[:6])}, ...)",
            True,
        )
    if g.efa and g.availability_zone is None:
        yield Problem(
            f"{path}.availabilityZone",
            "required with efa: EFA needs one subnet in one "
            f"AZ and a cluster placement group (choose one of {', '.join(zones(s))})",
        )
    if g.availability_zone is not None and g.availability_zone not in zones(s):
        yield Problem(
            f"{path}.availabilityZone",
            "must be one of the network's AZs: " + ", ".join(zones(s)),
            g.availability_zone,
        )
    if g.capacity_type == "capacityBlock" and not g.capacity_reservation_id:
        yield Problem(
            f"{path}.capacityReservationId",
            "required when capacityType is capacityBlock (the cr-... id of the block)",
        )
    yield from _positive(f"{path}.diskGib", g.disk_gib)


def deployment_rules(s: Settings) -> Iterator[Problem]:
    deps = s.serving.deployments
    if not deps:
        yield Problem("serving.deployments", "define at least one deployment")
        return
    yield from _unique("serving.deployments", [d.name for d in deps])
    yield from _unique(
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
    budget = _LWS_NAME_BUDGET - d.autoscaling.max_replicas // 10
    if not _DNS_LABEL.match(d.name) or len(d.name) > budget:
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
    yield from _positive(f"{path}.replicas", d.replicas)
    yield from _positive(f"{path}.startupBudgetMinutes", d.startup_budget_minutes)
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


def prod_rules(s: Settings) -> Iterator[Problem]:
    """What prod refuses that dev and staging tolerate."""
    if s.environment != "prod":
        return
    if not s.protect:
        yield Problem(
            "protect",
            "must be true in prod so `pulumi destroy` cannot delete data by accident",
            False,
        )
    for path, image in images(s):
        if not _DIGEST.search(image):
            yield Problem(
                path,
                "prod images must be pinned by digest (name:tag@sha256:<64 hex>); "
                "promote from staging to copy its digests",
                image,
            )
    for d in s.serving.deployments:
        path = deployment_path(s, d)
        if not _COMMIT.match(d.revision):
            yield Problem(
                f"{path}.revision",
                "prod needs a 40-character commit sha, not a branch "
                "or tag, so every node loads the same weights",
                d.revision,
            )
        group = next((g for g in s.gpu_node_groups if g.name == d.node_group), None)
        if d.nodes_per_group > 1 and group is not None and not group.efa:
            yield Problem(
                f"{path}.nodeGroup",
                f"a {d.nodes_per_group}-node deployment in prod "
                f"needs an EFA node group; {group.name} has efa: false (NCCL over TCP "
                "is an order of magnitude slower)",
                d.node_group,
            )


def images(s: Settings) -> list[tuple[str, str]]:
    """(key path, image) of every container image the stack runs."""
    found = [
        ("serving.vllmImage", s.serving.vllm_image),
        ("gateway.image", s.gateway.image),
        ("gateway.exporterImage", s.gateway.exporter_image),
    ]
    if s.redis.enabled:
        found += [("redis.image", s.redis.image), ("redis.exporterImage", s.redis.exporter_image)]
    if s.webui.enabled:
        found.append(("webui.image", s.webui.image))
    return found


def autoscaling_rules(s: Settings) -> Iterator[Problem]:
    demand: Counter[str] = Counter()
    for d in s.serving.deployments:
        path = f"{deployment_path(s, d)}.autoscaling"
        a = d.autoscaling
        if a.max_replicas < a.min_replicas:
            yield Problem(
                f"{path}.maxReplicas",
                f"must be at least minReplicas={a.min_replicas}",
                a.max_replicas,
            )
        if a.min_replicas == 0 and not a.scale_to_zero:
            yield Problem(
                f"{path}.minReplicas",
                "0 needs scaleToZero: true (cold starts take minutes); or use 1",
                0,
            )
        if not a.min_replicas <= d.replicas <= max(a.max_replicas, a.min_replicas):
            yield Problem(
                f"{deployment_path(s, d)}.replicas",
                "must lie between "
                f"autoscaling.minReplicas={a.min_replicas} and maxReplicas={a.max_replicas}",
                d.replicas,
            )
        demand[d.node_group] += a.max_replicas * d.nodes_per_group
    for i, g in enumerate(s.gpu_node_groups):
        if demand[g.name] > g.max_size:
            users = [d.name for d in s.serving.deployments if d.node_group == g.name]
            yield Problem(
                f"gpuNodeGroups[{i}].maxSize",
                f"deployments {', '.join(users)} may need "
                f"{demand[g.name]} nodes (maxReplicas x nodesPerGroup); raise maxSize "
                "or lower their maxReplicas",
                g.max_size,
            )


RULES: tuple[Rule, ...] = (
    network_rules,
    node_group_rules,
    deployment_rules,
    prod_rules,
    autoscaling_rules,
)


def validate(settings: Settings) -> list[Problem]:
    return [p for rule in RULES for p in rule(settings)]


_PLACEHOLDER = re.compile(r"^0+$")


def warnings(s: Settings) -> list[Problem]:
    """Pins that pass validation but cannot be deployed as written (all-zero placeholders)."""
    found = [
        Problem(
            path,
            "placeholder digest: resolve it (`crane digest IMAGE`) or promote from "
            "the previous stack before deploying",
            image,
        )
        for path, image in images(s)
        if "@sha256:" in image and _PLACEHOLDER.match(image.rsplit(":", 1)[1])
    ]
    found += [
        Problem(
            f"{deployment_path(s, d)}.revision",
            "placeholder revision: set the model's Hub commit sha before deploying",
            d.revision,
        )
        for d in s.serving.deployments
        if _PLACEHOLDER.match(d.revision)
    ]
    return found
