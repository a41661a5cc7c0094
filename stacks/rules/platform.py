"""Rules of the platform sections: tags, network, cluster, system and GPU node groups."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterator

from stacks.catalog import GIB, INSTANCE_TYPES, instance_type, model_spec
from stacks.naming import (
    EFA_LABEL,
    NODE_GROUP_LABEL,
    NODE_ROLE_LABEL,
    RESERVED_LABEL_DOMAINS,
    is_reserved_label,
)
from stacks.parse import Problem
from stacks.planner import format_bytes
from stacks.rules.common import DNS_LABEL, MIN_AZS, positive, sizes, unique, zones
from stacks.schema import GpuNodeGroupSettings, Settings
from stacks.subnet_plan import private_prefix
from stacks.versions import KUBERNETES_PINS, kubernetes_pins

# AWS tag limits; the NLB tags annotation is a comma-separated list of key=value pairs, so
# neither character can appear in a tag that also goes onto the load balancers.
_TAG_KEY_MAX = 128


_TAG_VALUE_MAX = 256


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


def node_group_rules(s: Settings) -> Iterator[Problem]:
    yield from unique("gpuNodeGroups", [g.name for g in s.gpu_node_groups])
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
    yield from sizes(
        sys_path, s.system_nodes.min_size, s.system_nodes.desired_size, s.system_nodes.max_size
    )
    for i, g in enumerate(s.gpu_node_groups):
        yield from _gpu_group_rules(s, f"gpuNodeGroups[{i}]", g)


def _gpu_group_rules(s: Settings, path: str, g: GpuNodeGroupSettings) -> Iterator[Problem]:
    if not DNS_LABEL.match(g.name):
        yield Problem(f"{path}.name", "must be a lowercase DNS label (a-z, 0-9, -)", g.name)
    yield from sizes(path, g.min_size, g.desired_size, g.max_size)
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
    yield from positive(f"{path}.diskGib", g.disk_gib)


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
            "this Kubernetes version (stacks/versions.py has "
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
