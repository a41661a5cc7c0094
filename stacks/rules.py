"""Cross-field validation of parsed settings. Every rule returns problems; none raises.

Rules are grouped by section so each stays short; `validate` runs them all and
the caller raises one SettingsError listing everything.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from components.naming import EFA_LABEL, NODE_GROUP_LABEL, NODE_ROLE_LABEL, WEBUI_API_KEY_ID
from components.nginx_conf import (
    HEADER_NAME,
    KEY_ID,
    NGINX_RESOLVE_MIN_VERSION,
    RESERVED_ROUTE_NAMES,
)
from components.node_group_spec import RESERVED_LABEL_DOMAINS, is_reserved_label
from components.redis_conf import LMCACHE_LOCAL_CPU_GIB
from components.subnet_plan import private_prefix
from components.versions import KUBERNETES_PINS, kubernetes_pins
from components.vllm_command import check_extra_args, parse_version
from components.vllm_pods import (
    default_cpu,
    default_memory_gib,
    max_cpu,
    max_memory_gib,
    pod_memory_gib,
    shm_size_bytes,
)
from stacks.catalog import GIB, INSTANCE_TYPES, MODELS, InstanceType, instance_type, model_spec
from stacks.parse import Problem, camel
from stacks.planner import Plan, PlanRequest, format_bytes, plan
from stacks.schema import DeploymentSettings, GpuNodeGroupSettings, Settings

# A DNS-1035 label: LWS names become Service and pod host names.
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
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


# AWS tag limits; the NLB tags annotation is a comma-separated list of key=value pairs, so
# neither character can appear in a tag that also goes onto the load balancers.
_TAG_KEY_MAX, _TAG_VALUE_MAX = 128, 256


def tag_rules(s: Settings) -> Iterator[Problem]:
    for key, value in s.tags.items():
        if not 1 <= len(key) <= _TAG_KEY_MAX or key.startswith("aws:"):
            yield Problem(
                f"tags.{key}",
                f"tag keys are 1-{_TAG_KEY_MAX} characters and may not start with aws:",
                value,
            )
        if len(value) > _TAG_VALUE_MAX:
            yield Problem(
                f"tags.{key}", f"tag values are at most {_TAG_VALUE_MAX} characters", value
            )
        if any(c in key + value for c in ",="):
            yield Problem(
                f"tags.{key}",
                "may not contain ',' or '=': tags are also passed to "
                "the load balancers in a key=value,key=value annotation",
                value,
            )


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
        if not DIGEST.search(image):
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
                "get (facts §A4)"
            )
            if value is None:
                yield Problem(f"serving.{key}", reason)
            else:
                yield Problem(f"serving.{key}", reason, value)


# HPA limits (autoscaling/v2 HPAScalingRules): stabilizationWindowSeconds in [0, 3600].
_MAX_STABILIZATION_SECONDS = 3600


def observability_rules(s: Settings) -> Iterator[Problem]:
    """Alert thresholds, Prometheus storage and per-deployment KEDA settings."""
    m = s.monitoring
    if s.autoscaling.keda and not m.enabled:
        yield Problem(
            "autoscaling.keda",
            "KEDA's triggers query Prometheus: set "
            "monitoring.enabled: true, or autoscaling.keda: false",
            True,
        )
    for field in ("retention_days", "volume_gib", "grafana_volume_gib", "scrape_interval_seconds"):
        yield from _positive(f"monitoring.{camel(field)}", getattr(m, field))
    yield from _alert_threshold_problems(s)
    for d in s.serving.deployments:
        path = f"{deployment_path(s, d)}.autoscaling"
        a = d.autoscaling
        yield from _positive(f"{path}.queueDepthTarget", a.queue_depth_target)
        if a.kv_cache_usage_target is not None and not 0 < a.kv_cache_usage_target <= 1:
            yield Problem(
                f"{path}.kvCacheUsageTarget",
                "must be a fraction in (0, 1], e.g. 0.8 (vllm:kv_cache_usage_perc is 0-1)",
                a.kv_cache_usage_target,
            )
        if not 0 <= a.scale_down_stabilization_seconds <= _MAX_STABILIZATION_SECONDS:
            yield Problem(
                f"{path}.scaleDownStabilizationSeconds",
                f"must be between 0 and {_MAX_STABILIZATION_SECONDS} (the HPA's limit)",
                a.scale_down_stabilization_seconds,
            )
        if a.min_replicas < 0:
            yield Problem(f"{path}.minReplicas", "must be 0 or more", a.min_replicas)
    yield from _positive(
        "autoscaling.pollingIntervalSeconds", s.autoscaling.polling_interval_seconds
    )


_FRACTIONS = ("kv_cache_usage", "gateway_5xx_ratio", "redis_memory_ratio")
_POSITIVE = (
    "queue_backlog",
    "queue_backlog_minutes",
    "kv_cache_minutes",
    "ttft_p95_seconds",
    "clock_offset_seconds",
)


def _alert_threshold_problems(s: Settings) -> Iterator[Problem]:
    a = s.monitoring.alerts
    for field in _FRACTIONS:
        value = getattr(a, field)
        if not 0 < value <= 1:
            yield Problem(
                f"monitoring.alerts.{camel(field)}", "must be a fraction in (0, 1], e.g. 0.9", value
            )
    for field in _POSITIVE:
        yield from _positive(f"monitoring.alerts.{camel(field)}", getattr(a, field))
    if a.worker_restarts_per_hour < 0:
        yield Problem(
            "monitoring.alerts.workerRestartsPerHour",
            "must be 0 or more",
            a.worker_restarts_per_hour,
        )


# Disk a GPU node needs besides the weights it caches: the vLLM image (~15 GB compressed; containerd
# keeps the layers and their unpacked snapshot) and the OS, logs and DaemonSet images.
VLLM_IMAGE_DISK_GIB = 40
NODE_SYSTEM_DISK_GIB = 20
# VPC CNI gives every pod a VPC address: a private subnet smaller than this runs out.
_LARGEST_PRIVATE_PREFIX = 22
_PLATFORM_LABELS = frozenset({NODE_GROUP_LABEL, NODE_ROLE_LABEL, EFA_LABEL})


def platform_rules(s: Settings) -> Iterator[Problem]:
    """What the network, cluster and node group components need (components/network.py, ...)."""
    if kubernetes_pins(s.cluster.version) is None:
        yield Problem(
            "cluster.version",
            "no pinned EKS add-on and Cluster Autoscaler versions for "
            "this Kubernetes version (components/versions.py has "
            f"{', '.join(sorted(KUBERNETES_PINS))}); add a row there or use one of them",
            s.cluster.version,
        )
    if s.cluster.mode == "existing" and s.network.mode == "new":
        yield Problem(
            "network.mode",
            "an existing cluster's nodes must join its own VPC: set "
            "network.mode: existing with that VPC's vpcId and subnets",
            "new",
        )
    yield from _vpc_size_problems(s)
    for i, g in enumerate(s.gpu_node_groups):
        yield from _gpu_group_platform_problems(s, f"gpuNodeGroups[{i}]", g)


def _vpc_size_problems(s: Settings) -> Iterator[Problem]:
    n = s.network
    if n.mode != "new" or not n.availability_zones:
        return
    try:
        vpc = ipaddress.ip_network(n.cidr)
    except ValueError:
        return  # reported by network_rules
    private = private_prefix(n.cidr, len(n.availability_zones))
    if private > _LARGEST_PRIVATE_PREFIX:
        yield Problem(
            "network.cidr",
            f"too small: each of the {len(n.availability_zones)} AZs "
            f"would get a /{private} private subnet, and every pod takes a VPC address "
            f"(VPC CNI); use a /{vpc.prefixlen - (private - _LARGEST_PRIVATE_PREFIX)} "
            "or larger",
            n.cidr,
        )


def _gpu_group_platform_problems(
    s: Settings, path: str, g: GpuNodeGroupSettings
) -> Iterator[Problem]:
    if g.capacity_type == "capacityBlock" and g.availability_zone is None:
        yield Problem(
            f"{path}.availabilityZone",
            "required when capacityType is capacityBlock: "
            "a Capacity Block lives in one AZ; give the AZ it was bought in",
        )
    if g.capacity_reservation_id is not None and g.capacity_type != "capacityBlock":
        yield Problem(
            f"{path}.capacityReservationId",
            "only used with capacityType: "
            f"capacityBlock (capacityType is {g.capacity_type}); remove it or change "
            "capacityType",
            g.capacity_reservation_id,
        )
    for key in g.labels:
        if is_reserved_label(key):
            yield Problem(
                f"{path}.labels.{key}",
                "EKS refuses node group labels in the domains "
                + ", ".join(RESERVED_LABEL_DOMAINS)
                + " (and their subdomains); use "
                "your own prefix",
                g.labels[key],
            )
        elif key in _PLATFORM_LABELS:
            yield Problem(
                f"{path}.labels.{key}",
                "set by the platform from the group's name and efa setting; remove it",
                g.labels[key],
            )
    yield from _disk_problems(s, path, g)


def _disk_problems(s: Settings, path: str, g: GpuNodeGroupSettings) -> Iterator[Problem]:
    """The root volume holds the vLLM image and every model its engines cache on the node."""
    cached = {
        d.model: d.name
        for d in s.serving.deployments
        if d.node_group == g.name and d.weights.cache == "node" and d.weights.s3_uri is None
    }
    specs = {model: model_spec(model) for model in cached}
    weights = sum(spec.weight_bytes for spec in specs.values() if spec is not None)
    need_gib = math.ceil(weights / GIB) + VLLM_IMAGE_DISK_GIB + NODE_SYSTEM_DISK_GIB
    if g.disk_gib < need_gib:
        users = ", ".join(sorted(cached.values()))
        yield Problem(
            f"{path}.diskGib",
            f"too small for the weights {users} cache on the node "
            f"({format_bytes(weights)}), the vLLM image ({VLLM_IMAGE_DISK_GIB} GiB) and "
            f"the system ({NODE_SYSTEM_DISK_GIB} GiB); use at least {need_gib}",
            g.disk_gib,
        )


# Redis's AOF rewrite writes the new file next to the old one, so the volume holds two copies.
AOF_VOLUME_FACTOR = 2
# Open WebUI reads WEBUI_ADMIN_EMAIL/WEBUI_ADMIN_PASSWORD from 0.7.0 on (CHANGELOG, #17654).
WEBUI_ADMIN_ENV_SINCE = (0, 7, 0)


def data_rules(s: Settings) -> Iterator[Problem]:
    """Redis: sizes that fit, and TTLs that expire."""
    r = s.redis
    if not r.enabled:
        return
    yield from _positive("redis.maxmemoryMib", r.maxmemory_mib)
    yield from _positive("redis.visionCacheTtlSeconds", r.vision_cache_ttl_seconds)
    yield from _positive("redis.sessionTtlSeconds", r.session_ttl_seconds)
    need_gib = math.ceil(AOF_VOLUME_FACTOR * r.maxmemory_mib / 1024)
    if r.volume_gib < need_gib:
        yield Problem(
            "redis.volumeGib",
            f"must hold two AOF copies of maxmemoryMib="
            f"{r.maxmemory_mib} (a rewrite writes the new file beside the old one); "
            f"use at least {need_gib}",
            r.volume_gib,
        )


def webui_rules(s: Settings) -> Iterator[Problem]:
    w = s.webui
    if not w.enabled:
        return
    if WEBUI_API_KEY_ID not in s.gateway.api_key_ids:
        yield Problem(
            "gateway.apiKeyIds",
            f"must include {WEBUI_API_KEY_ID!r} while "
            "webui.enabled is true: the web UI calls the gateway with a key of its "
            "own (add it, or set webui.enabled: false)",
            list(s.gateway.api_key_ids),
        )
    if not s.redis.enabled:
        yield Problem(
            "webui.enabled",
            "needs redis.enabled: true (the web UI keeps its "
            "websocket state in Redis); enable Redis or disable the web UI",
            True,
        )
    if w.replicas != 1:
        yield Problem(
            "webui.replicas",
            "must be 1: Open WebUI keeps users and chats in SQLite "
            "on a ReadWriteOnce volume that one pod mounts; more replicas would need "
            "an external database and shared storage, which this stack does not run",
            w.replicas,
        )
    yield from _positive("webui.volumeGib", w.volume_gib)


def webui_warnings(s: Settings) -> list[Problem]:
    """An image that ignores the admin account variables starts with no account to sign in."""
    if not s.webui.enabled:
        return []
    tag = s.webui.image.split("@", 1)[0].rsplit("/", 1)[-1].partition(":")[2]
    version = parse_version(tag.removeprefix("v"))
    if version is None or version >= WEBUI_ADMIN_ENV_SINCE:
        return []
    since = ".".join(map(str, WEBUI_ADMIN_ENV_SINCE))
    return [
        Problem(
            "webui.image",
            f"Open WebUI before {since} ignores WEBUI_ADMIN_EMAIL/"
            "WEBUI_ADMIN_PASSWORD, and signup is off: the web UI would start with no "
            f"account anyone can sign in with; pin {since} or later",
            s.webui.image,
        )
    ]


# Gateway (components/nginx_conf.py, components/gateway.py).
_ACM_ARN = re.compile(r"^arn:aws[-a-z]*:acm:([a-z0-9-]+):\d{12}:certificate/[0-9a-f-]+$")
_NGINX_TAG = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:-[a-z0-9.-]+)?$")
# 10 MiB: a few base64 images (4/3 inflation) must fit; the policy pack enforces the same floor.
MIN_BODY_MIB = 10
GATEWAY_BODY_MIB_RANGE = (MIN_BODY_MIB, 1024)
GATEWAY_READ_TIMEOUT_RANGE = (60, 3600)
_MAX_KEY_ID_LENGTH = 40


def gateway_rules(s: Settings) -> Iterator[Problem]:
    g = s.gateway
    yield from _positive("gateway.replicas", g.replicas)
    if s.environment == "prod" and g.replicas < 2:  # noqa: PLR2004 (one pod is no redundancy)
        yield Problem(
            "gateway.replicas",
            "prod needs at least 2 (a PodDisruptionBudget and a node drain must leave one serving)",
            g.replicas,
        )
    yield from _nginx_image_problems(g.image)
    lo, hi = GATEWAY_BODY_MIB_RANGE
    if not lo <= g.client_max_body_size_mib <= hi:
        yield Problem(
            "gateway.clientMaxBodySizeMib",
            f"must lie between {lo} and {hi}: below {lo} MiB image requests get 413, "
            "above it bodies only cost scratch space on the pod's volume",
            g.client_max_body_size_mib,
        )
    lo, hi = GATEWAY_READ_TIMEOUT_RANGE
    if not lo <= g.read_timeout_seconds <= hi:
        yield Problem(
            "gateway.readTimeoutSeconds",
            f"must lie between {lo} and {hi}: below "
            f"{lo} s long prefills get 504s; the pod also waits this long for "
            "streams to end when it stops",
            g.read_timeout_seconds,
        )
    if not HEADER_NAME.match(g.affinity_header):
        yield Problem(
            "gateway.affinityHeader",
            "must be an HTTP header name of letters, digits "
            "and single dashes (nginx ignores headers with underscores)",
            g.affinity_header,
        )
    yield from _api_key_id_problems(g.api_key_ids)
    if round(g.rate_limit.requests_per_second * 60) < 1:
        yield Problem(
            "gateway.rateLimit.requestsPerSecond",
            "must allow at least 1 request per "
            "minute (nginx counts whole requests per second or minute)",
            g.rate_limit.requests_per_second,
        )
    if g.rate_limit.burst < 0:
        yield Problem("gateway.rateLimit.burst", "must be 0 or more", g.rate_limit.burst)
    yield from _gateway_tls_problems(s)
    for d in s.serving.deployments:
        if d.name in RESERVED_ROUTE_NAMES:
            yield Problem(
                f"{deployment_path(s, d)}.name",
                "clashes with a gateway path "
                f"(/{d.name}/...); reserved: {', '.join(sorted(RESERVED_ROUTE_NAMES))}",
                d.name,
            )


def _nginx_image_problems(image: str) -> Iterator[Problem]:
    tag = image.split("@", 1)[0].rsplit("/", 1)[-1].partition(":")[2]
    found = _NGINX_TAG.match(tag)
    want = ".".join(map(str, NGINX_RESOLVE_MIN_VERSION))
    if found is None:
        yield Problem(
            "gateway.image",
            f"needs a version tag (nginx:X.Y.Z, >= {want}) so the "
            "upstream `resolve` parameter is known to exist",
            image,
        )
    elif tuple(int(p) for p in found.groups()) < NGINX_RESOLVE_MIN_VERSION:
        yield Problem(
            "gateway.image",
            f"nginx {found.group(0)} lacks upstream `resolve` (open "
            f"source since {want}), so leader pods would never be re-resolved; use "
            f"{want} or later, e.g. nginx:1.28.0",
            image,
        )


def _api_key_id_problems(ids: tuple[str, ...]) -> Iterator[Problem]:
    if not ids:
        yield Problem("gateway.apiKeyIds", "give at least one key id: every request needs a key")
    yield from _unique("gateway.apiKeyIds", list(ids))
    for i, key_id in enumerate(ids):
        if not KEY_ID.match(key_id) or len(key_id) > _MAX_KEY_ID_LENGTH:
            yield Problem(
                f"gateway.apiKeyIds[{i}]",
                f"must be a DNS label of at most "
                f"{_MAX_KEY_ID_LENGTH} characters (a-z, 0-9, -); it names the key in "
                "logs and resources",
                key_id,
            )


def _gateway_tls_problems(s: Settings) -> Iterator[Problem]:
    arn = s.gateway.tls_certificate_arn
    if arn is None:
        if s.gateway.scheme == "internet-facing":
            yield Problem(
                "gateway.tlsCertificateArn",
                "required with scheme internet-facing: "
                "API keys must not cross the internet in clear text (give an ACM "
                "certificate ARN, or use scheme internal)",
            )
        return
    found = _ACM_ARN.match(arn)
    if found is None:
        yield Problem(
            "gateway.tlsCertificateArn",
            "must be an ACM certificate ARN (arn:aws:acm:<region>:<account>:certificate/<id>)",
            arn,
        )
    elif found.group(1) != s.region:
        yield Problem(
            "gateway.tlsCertificateArn",
            f"must be in the stack's region {s.region} "
            "(an NLB uses certificates of its own region)",
            arn,
        )


RULES: tuple[Rule, ...] = (
    tag_rules,
    network_rules,
    node_group_rules,
    deployment_rules,
    prod_rules,
    autoscaling_rules,
    engine_rules,
    observability_rules,
    platform_rules,
    data_rules,
    webui_rules,
    gateway_rules,
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
    found += webui_warnings(s)
    return found
