"""The guardrails of the policy pack: one policy per pain point or org rule.

The pain points and their sources: docs/reference/peers.md.

Every policy reads the resource inputs in their wire form (camelCase keys, Kubernetes
objects with apiVersion/kind), which is what `pulumi preview --policy-pack policy`
hands to the analyzer and what the tests' recording mock monitor records; the tests
send those records to this pack over the analyzer protocol, as the CLI does. A value
that is unknown during preview (an id not created yet) makes the SDK skip the policy
for that resource with an advisory note instead of a false violation.

Enforcement: MANDATORY for what breaks serving or exposes data; ADVISORY for hygiene
that a team may adopt gradually.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pulumi_policy import (
    EnforcementLevel,
    PolicyConfigSchema,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

from components.render.vllm_pods import quantity
from stacks.naming import (
    EFA_LABEL,
    EFA_RESOURCE,
    GPU_RESOURCE,
    GRAFANA_PORT,
    PROMETHEUS_PORT,
    REDIS_PORT,
)
from stacks.planner import format_bytes, min_shm_bytes
from stacks.rules.common import DIGEST
from stacks.rules.gateway import MIN_BODY_MIB

SHM_PATH: Final = "/dev/shm"
# Smallest client_max_body_size that still takes a few base64 images (nginx's default
# 1 MiB answers them with 413).
MIN_BODY_BYTES: Final = MIN_BODY_MIB * 1024 * 1024
# A Service of type LoadBalancer gets an internal NLB only when one of these says so
# (the in-tree AWS cloud provider defaults to internet-facing).
LB_SCHEME_ANNOTATION: Final = "service.beta.kubernetes.io/aws-load-balancer-scheme"
LB_INTERNAL_ANNOTATION: Final = "service.beta.kubernetes.io/aws-load-balancer-internal"
DATA_SERVICE_NAMES: Final = ("redis", "prometheus", "grafana")
DATA_SERVICE_PORTS: Final = frozenset({REDIS_PORT, PROMETHEUS_PORT, GRAFANA_PORT})
EFA_INTERFACE_TYPES: Final = frozenset({"efa", "efa-only"})
ALL_PROTOCOLS: Final = frozenset({"-1", "all"})
# Stacks whose images must be pinned by digest unless the policy config says otherwise.
DEFAULT_DIGEST_STACKS: Final = ("prod",)

_WORKLOADS_WITH_TEMPLATE: Final = frozenset(
    {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
)


# --- reading Kubernetes objects -------------------------------------------------------------------


@dataclass(frozen=True)
class PodTemplate:
    """One pod template of a workload, with the size of the group it runs in."""

    where: str  # "LeaderWorkerSet qwen3-vl-235b worker", for messages
    spec: Mapping[str, Any]
    nodes: int  # pods of one group (LeaderWorkerSet size); 1 for everything else


# The analyzer hands policies its own read-only views of the inputs (pulumi_policy's
# unknown-checking proxies: a Mapping and a Sequence, neither a dict nor a list), so objects
# and arrays are told apart by those abstract types only.
def _m(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _seq(value: Any) -> Sequence[Any]:
    return value if isinstance(value, Sequence) and not isinstance(value, str | bytes) else ()


def kubernetes_object(args: ResourceValidationArgs) -> Mapping[str, Any] | None:
    """The object of a Kubernetes resource (not a Helm release), else None."""
    if not args.resource_type.startswith("kubernetes:") or "kind" not in args.props:
        return None
    return args.props


def pod_templates(args: ResourceValidationArgs) -> list[PodTemplate]:
    """Every pod template a Kubernetes workload carries (none for other resources)."""
    obj = kubernetes_object(args)
    if obj is None:
        return []
    kind = obj["kind"]
    name = _m(obj.get("metadata")).get("name") or args.name
    spec = _m(obj.get("spec"))
    found: list[tuple[str, Mapping[str, Any], int]] = []
    if kind in _WORKLOADS_WITH_TEMPLATE:
        found.append(("pod", _m(spec.get("template")), 1))
    elif kind == "CronJob":
        found.append(("pod", _m(_m(_m(spec.get("jobTemplate")).get("spec")).get("template")), 1))
    elif kind == "Pod":
        found.append(("pod", obj, 1))
    elif kind == "LeaderWorkerSet":
        lwt = _m(spec.get("leaderWorkerTemplate"))
        size = int(lwt.get("size") or 1)
        worker = _m(lwt.get("workerTemplate"))
        # Without a leaderTemplate, LWS runs the leader from the worker template.
        found += [
            ("leader", _m(lwt.get("leaderTemplate")) or worker, size),
            ("worker", worker, size),
        ]
    return [
        PodTemplate(f"{kind} {name} {role}", _m(t.get("spec")), nodes)
        for role, t, nodes in found
        if t
    ]


def containers(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [_m(c) for c in [*_seq(spec.get("initContainers")), *_seq(spec.get("containers"))]]


def resource_count(container: Mapping[str, Any], resource: str) -> int:
    """An extended resource's count; limits rule (requests default to them)."""
    r = _m(container.get("resources"))
    value = _m(r.get("limits")).get(resource, _m(r.get("requests")).get(resource, 0))
    return int(value)


def pod_count(spec: Mapping[str, Any], resource: str) -> int:
    return sum(resource_count(c, resource) for c in containers(spec))


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([KMGTPE]i?|k|m)?$")
_FACTORS: Final = {
    None: 1,
    "m": 0.001,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def quantity_bytes(value: Any) -> int | None:
    """A Kubernetes quantity ("16Gi", "17179869184", "1.5G") in bytes; None if unreadable."""
    match = _QUANTITY.match(str(value).strip())
    if match is None:
        return None
    return int(float(match.group(1)) * _FACTORS[match.group(2)])


def _stack_of(urn: str) -> str:
    # urn:pulumi:<stack>::<project>::<type>::<name>
    return urn.split("::", 1)[0].rsplit(":", 1)[-1]


# --- GPU pods: /dev/shm, EFA, service links --------------------------------------------------------


def _shm_bytes(t: PodTemplate) -> int | None:
    """Size limit of the in-memory emptyDir mounted at /dev/shm in every GPU container."""
    volumes = {_m(v).get("name"): _m(v) for v in _seq(t.spec.get("volumes"))}
    sizes: list[int] = []
    for c in containers(t.spec):
        if resource_count(c, GPU_RESOURCE) == 0:
            continue
        mounts = [_m(m) for m in _seq(c.get("volumeMounts")) if _m(m).get("mountPath") == SHM_PATH]
        empty_dir = _m(volumes.get(mounts[0].get("name"), {}).get("emptyDir")) if mounts else {}
        if empty_dir.get("medium") != "Memory":
            return None
        sizes.append(quantity_bytes(empty_dir.get("sizeLimit", "")) or 0)
    return min(sizes, default=None)


def check_gpu_shm(args: ResourceValidationArgs, report: ReportViolation) -> None:
    for t in pod_templates(args):
        gpus = pod_count(t.spec, GPU_RESOURCE)
        if gpus == 0 or (gpus == 1 and t.nodes == 1):
            continue
        need = min_shm_bytes(gpus, t.nodes)
        have = _shm_bytes(t)
        if have is None or have < need:
            found = "none" if have is None else format_bytes(have)
            report(
                f"{t.where}: {gpus} GPU(s) per pod x {t.nodes} pod(s) per group need an in-memory "
                f"/dev/shm of at least {format_bytes(need)} (found {found}); NCCL and vLLM's "
                "shared-memory queues die with bus errors in the 64 MiB default. Mount an emptyDir "
                f"{{medium: Memory, sizeLimit: {quantity(need)}}} at /dev/shm.",
                None,
            )


def _selects_efa_nodes(spec: Mapping[str, Any]) -> bool:
    if _m(spec.get("nodeSelector")).get(EFA_LABEL) == "true":
        return True
    required = _m(
        _m(_m(spec.get("affinity")).get("nodeAffinity")).get(
            "requiredDuringSchedulingIgnoredDuringExecution"
        )
    )
    return any(
        _m(e).get("key") == EFA_LABEL and "true" in _seq(_m(e).get("values"))
        for term in _seq(required.get("nodeSelectorTerms"))
        for e in _seq(_m(term).get("matchExpressions"))
    )


def check_efa_on_every_member(args: ResourceValidationArgs, report: ReportViolation) -> None:
    templates = [t for t in pod_templates(args) if t.nodes > 1]
    counts = {t.where: pod_count(t.spec, EFA_RESOURCE) for t in templates}
    if not any(_selects_efa_nodes(t.spec) for t in templates) and not any(counts.values()):
        return  # a multi-node group on TCP: settings refuse that in prod
    for where, count in counts.items():
        if count == 0:
            report(
                f"{where}: a multi-node group on EFA nodes must request {EFA_RESOURCE} on the "
                "leader AND the workers; without it NCCL falls back to TCP sockets for this pod "
                "and the whole group runs at socket speed.",
                None,
            )
    if 0 not in counts.values() and len(set(counts.values())) > 1:
        report(
            f"EFA interfaces differ between leader and workers ({counts}): request the same "
            "count on both so every rank gets the same bandwidth.",
            None,
        )


def check_no_vllm_service(args: ResourceValidationArgs, report: ReportViolation) -> None:
    obj = kubernetes_object(args)
    is_service = obj is not None and obj["kind"] == "Service"
    if is_service and _m(args.props.get("metadata")).get("name") == "vllm":
        report(
            "a Service named `vllm` makes Kubernetes inject VLLM_PORT=tcp://<ip>:<port> into "
            "pods, which vLLM reads as its own setting and fails on; rename the Service.",
            None,
        )


def check_engine_service_links(args: ResourceValidationArgs, report: ReportViolation) -> None:
    for t in pod_templates(args):
        if pod_count(t.spec, GPU_RESOURCE) == 0:
            continue
        if t.spec.get("enableServiceLinks") is not False:
            report(
                f"{t.where}: GPU (engine) pods need enableServiceLinks: false, so no Service's "
                "*_PORT variables (VLLM_PORT among them) reach vLLM's environment.",
                None,
            )


# --- images, exposure, gateway config, resources ---------------------------------------------------


def check_images_pinned(args: ResourceValidationArgs, report: ReportViolation) -> None:
    stacks = args.get_config().get("stacks", list(DEFAULT_DIGEST_STACKS))
    if _stack_of(args.urn) not in stacks:
        return
    for t in pod_templates(args):
        for c in containers(t.spec):
            image = str(c.get("image", ""))
            if not DIGEST.search(image):
                report(
                    f"{t.where}: container {c.get('name')} runs {image!r}, a tag that can move; "
                    f"stack {_stack_of(args.urn)} must pin name:tag@sha256:<digest> (promote "
                    "from the previous stack to copy its digests).",
                    None,
                )


def _is_internal(annotations: Mapping[str, Any]) -> bool:
    return (
        annotations.get(LB_SCHEME_ANNOTATION) == "internal"
        or str(annotations.get(LB_INTERNAL_ANNOTATION, "")).lower() == "true"
    )


def _is_data_service(obj: Mapping[str, Any], args: ResourceValidationArgs) -> bool:
    meta = _m(obj.get("metadata"))
    spec = _m(obj.get("spec"))
    words = [
        args.name,
        str(meta.get("name", "")),
        *map(str, _m(meta.get("labels")).values()),
        *map(str, _m(spec.get("selector")).values()),
    ]
    ports = {_m(p).get("port") for p in _seq(spec.get("ports"))}
    named = any(n in w.lower() for w in words for n in DATA_SERVICE_NAMES)
    return named or bool(ports & DATA_SERVICE_PORTS)


def _load_balancer_blocks(value: Any) -> Iterator[Mapping[str, Any]]:
    """Every `{type: LoadBalancer, annotations: ...}` mapping inside Helm values."""
    if isinstance(value, Mapping):
        if value.get("type") == "LoadBalancer":
            yield value
        for v in value.values():
            yield from _load_balancer_blocks(v)
    for v in _seq(value):
        yield from _load_balancer_blocks(v)


def check_no_public_data_services(args: ResourceValidationArgs, report: ReportViolation) -> None:
    obj = kubernetes_object(args)
    if obj is not None and obj["kind"] == "Service":
        spec = _m(obj.get("spec"))
        annotations = _m(_m(obj.get("metadata")).get("annotations"))
        if (
            spec.get("type") == "LoadBalancer"
            and _is_data_service(obj, args)
            and not _is_internal(annotations)
        ):
            report(
                f"Service {args.name} exposes Redis, Prometheus or Grafana through an "
                f"internet-facing load balancer; annotate it {LB_SCHEME_ANNOTATION}: internal, "
                "or use ClusterIP and reach it through the gateway or a port-forward.",
                None,
            )
    elif args.resource_type == "kubernetes:helm.sh/v3:Release":
        chart = str(args.props.get("chart", ""))
        if not any(n in chart for n in DATA_SERVICE_NAMES):
            return
        for block in _load_balancer_blocks(args.props.get("values", {})):
            if not _is_internal(_m(block.get("annotations"))):
                report(
                    f"Helm release {args.name} ({chart}) asks for an internet-facing "
                    f"LoadBalancer; add the annotation {LB_SCHEME_ANNOTATION}: internal.",
                    None,
                )


_NGINX_SIZE = re.compile(r"^([0-9]+)([kKmMgG]?)$")
_NGINX_FACTORS: Final = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}


def nginx_size(value: str) -> int | None:
    match = _NGINX_SIZE.match(value)
    return None if match is None else int(match.group(1)) * _NGINX_FACTORS[match.group(2).lower()]


def _directives(text: str, name: str) -> list[str]:
    """Arguments of every `name ...;` directive, comments stripped."""
    code = re.sub(r"#[^\n]*", "", text)
    return [m.group(1).strip() for m in re.finditer(rf"(?<![\w$]){name}\s+([^;]*);", code)]


def check_gateway_config(args: ResourceValidationArgs, report: ReportViolation) -> None:
    obj = kubernetes_object(args)
    if obj is None or obj["kind"] != "ConfigMap":
        return
    for key, text in _m(obj.get("data")).items():
        if not isinstance(text, str) or "proxy_pass" not in text:
            continue  # not an nginx config that proxies
        buffering = _directives(text, "proxy_buffering")
        if "off" not in buffering or "on" in buffering:
            report(
                f"ConfigMap {args.name} {key}: nginx must keep `proxy_buffering off;` (and never "
                "on) so SSE tokens stream to the client as they are generated.",
                None,
            )
        bodies = _directives(text, "client_max_body_size")
        too_small = [b for b in bodies if (nginx_size(b) or 0) < MIN_BODY_BYTES and b != "0"]
        if not bodies or too_small:
            report(
                f"ConfigMap {args.name} {key}: client_max_body_size must be set to at least 10m "
                f"everywhere (found {bodies or 'the 1m default'}); base64 images exceed 1 MiB "
                "and get 413.",
                None,
            )


def check_container_resources(args: ResourceValidationArgs, report: ReportViolation) -> None:
    for t in pod_templates(args):
        for c in containers(t.spec):
            r = _m(c.get("resources"))
            requests, limits = _m(r.get("requests")), _m(r.get("limits"))
            missing = [f"requests.{k}" for k in ("cpu", "memory") if k not in requests]
            missing += [f"limits.{k}" for k in ("memory",) if k not in limits]
            if missing:
                report(
                    f"{t.where}: container {c.get('name')} has no resources "
                    f"{', '.join(missing)}; the scheduler packs it blindly and the OOM killer "
                    "picks it first.",
                    None,
                )


# --- AWS: EFA security groups and placement ---------------------------------------------------------


def _efa_interfaces(props: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [
        _m(i)
        for i in _seq(props.get("networkInterfaces"))
        if _m(i).get("interfaceType") in EFA_INTERFACE_TYPES
    ]


def _self_rules(resources: Sequence[Any]) -> tuple[set[str], set[str]]:
    """Security group ids with an all-traffic self-referencing (ingress, egress) rule."""
    ingress: set[str] = set()
    egress: set[str] = set()
    for r in resources:
        p = r.props
        if r.resource_type in (
            "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule",
            "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule",
        ):
            sg = p.get("securityGroupId")
            if (
                sg
                and p.get("referencedSecurityGroupId") == sg
                and p.get("ipProtocol") in ALL_PROTOCOLS
            ):
                (ingress if "Ingress" in r.resource_type else egress).add(sg)
        elif (
            r.resource_type == "aws:ec2/securityGroupRule:SecurityGroupRule"
            and p.get("self") is True
            and str(p.get("protocol")) in ALL_PROTOCOLS
        ):
            (ingress if p.get("type") == "ingress" else egress).add(p.get("securityGroupId"))
    return ingress, egress


def check_efa_security_groups(args: StackValidationArgs, report: ReportViolation) -> None:
    ingress, egress = _self_rules(args.resources)
    both = ingress & egress
    for r in args.resources:
        if r.resource_type != "aws:ec2/launchTemplate:LaunchTemplate":
            continue
        for i, interface in enumerate(_efa_interfaces(r.props)):
            groups = set(map(str, _seq(interface.get("securityGroups"))))
            if not groups & both:
                report(
                    f"launch template {r.name}: EFA interface {i} has no security group that "
                    "allows all traffic to AND from itself (a self-referencing ingress and egress "
                    "rule, protocol -1); EFA's SRD traffic is dropped without both.",
                    r.urn,
                )


def check_efa_placement(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type == "aws:ec2/placementGroup:PlacementGroup":
        if args.props.get("strategy") != "cluster":
            report(
                f"placement group {args.name} has strategy {args.props.get('strategy')!r}; EFA "
                "groups need `cluster` (one spine, lowest latency).",
                None,
            )
    elif args.resource_type == "aws:ec2/launchTemplate:LaunchTemplate":
        placement = _m(args.props.get("placement"))
        if _efa_interfaces(args.props) and not (
            placement.get("groupName") or placement.get("groupId")
        ):
            report(
                f"launch template {args.name} attaches EFA interfaces outside a placement "
                "group; put EFA nodes in a cluster placement group.",
                None,
            )


# --- the pack ---------------------------------------------------------------------------------------

MANDATORY = EnforcementLevel.MANDATORY

POLICIES: Final[tuple[ResourceValidationPolicy | StackValidationPolicy, ...]] = (
    ResourceValidationPolicy(
        name="gpu-pods-have-shm",
        description="Multi-GPU and multi-node GPU pods mount an in-memory /dev/shm of at least "
        "the planner's minimum.",
        validate=check_gpu_shm,
        enforcement_level=MANDATORY,
    ),
    ResourceValidationPolicy(
        name="efa-on-leader-and-workers",
        description="Multi-node LeaderWorkerSet groups on EFA nodes request EFA on the leader "
        "and on the workers.",
        validate=check_efa_on_every_member,
        enforcement_level=MANDATORY,
    ),
    ResourceValidationPolicy(
        name="no-service-named-vllm",
        description="No Service is named `vllm` (its VLLM_PORT variable breaks vLLM).",
        validate=check_no_vllm_service,
        enforcement_level=MANDATORY,
    ),
    ResourceValidationPolicy(
        name="engine-service-links-off",
        description="GPU engine pods set enableServiceLinks: false.",
        validate=check_engine_service_links,
        enforcement_level=MANDATORY,
    ),
    ResourceValidationPolicy(
        name="images-pinned-by-digest",
        description="Containers of the configured stacks (default: prod) run images pinned by "
        "digest.",
        validate=check_images_pinned,
        enforcement_level=MANDATORY,
        config_schema=PolicyConfigSchema(
            properties={
                "stacks": {
                    "type": "array",
                    "items": {"type": "string"},
                    "default": list(DEFAULT_DIGEST_STACKS),
                },
            }
        ),
    ),
    ResourceValidationPolicy(
        name="no-internet-facing-data-services",
        description="Redis, Prometheus and Grafana are never behind an internet-facing load "
        "balancer.",
        validate=check_no_public_data_services,
        enforcement_level=MANDATORY,
    ),
    ResourceValidationPolicy(
        name="gateway-streams-and-takes-images",
        description="The gateway's nginx config keeps proxy_buffering off and "
        "client_max_body_size >= 10m.",
        validate=check_gateway_config,
        enforcement_level=MANDATORY,
    ),
    StackValidationPolicy(
        name="efa-security-group-self-referencing",
        description="Every EFA interface has a security group allowing all traffic to and from "
        "itself.",
        validate=check_efa_security_groups,
        enforcement_level=MANDATORY,
    ),
    ResourceValidationPolicy(
        name="efa-in-cluster-placement-group",
        description="EFA launch templates use a placement group, and placement groups use the "
        "cluster strategy.",
        validate=check_efa_placement,
        enforcement_level=MANDATORY,
    ),
    ResourceValidationPolicy(
        name="containers-have-requests-and-limits",
        description="Every container requests CPU and memory and limits memory.",
        validate=check_container_resources,
        enforcement_level=EnforcementLevel.ADVISORY,
    ),
)
