"""The policy pack: each rule on a violating and a compliant input, then on every stack.

Rules are called the way the analyzer calls them, `policy.validate(args, report)`,
with arguments built like the analyzer builds them; the PolicyPack itself is never
constructed (it starts a gRPC server and blocks).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import pytest
from pulumi_policy import (
    PolicyCustomTimeouts,
    PolicyResource,
    PolicyResourceOptions,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)
from pulumi_policy.deserialize import deserialize_properties

from components.naming import EFA_LABEL, EFA_RESOURCE, GPU_RESOURCE
from policy.rules import POLICIES
from tests.harness import Resource, StackRun, run_stack

STACKS = ["dev", "staging", "prod"]
BY_NAME = {p.name: p for p in POLICIES}
PINNED = "vllm/vllm-openai:v0.33.0@sha256:" + "ab" * 32
OPTS = PolicyResourceOptions(False, [], None, [], PolicyCustomTimeouts(0, 0, 0), [])
LWS_TYPE = "kubernetes:leaderworkerset.x-k8s.io/v1:LeaderWorkerSet"


def urn(stack: str, typ: str, name: str) -> str:
    return f"urn:pulumi:{stack}::qwen-vl-serving::{typ}::{name}"


def check(
    policy: str,
    typ: str,
    props: Mapping[str, Any],
    *,
    stack: str = "prod",
    config: Mapping[str, Any] | None = None,
    name: str = "r",
) -> list[str]:
    """Violations one resource policy reports for one resource."""
    rule = BY_NAME[policy]
    assert isinstance(rule, ResourceValidationPolicy)
    found: list[str] = []
    args = ResourceValidationArgs(typ, props, urn(stack, typ, name), name, OPTS, None, config)
    rule.validate(args, lambda message, _urn=None: found.append(message))
    return found


def check_stack(policy: str, resources: list[PolicyResource]) -> list[str]:
    rule = BY_NAME[policy]
    assert isinstance(rule, StackValidationPolicy)
    found: list[str] = []
    rule.validate(StackValidationArgs(resources), lambda message, _urn=None: found.append(message))
    return found


def policy_resource(
    typ: str, name: str, props: Mapping[str, Any], stack: str = "prod"
) -> PolicyResource:
    return PolicyResource(typ, props, urn(stack, typ, name), name, OPTS, None, None, [], {})


# --- inputs -----------------------------------------------------------------------------------------


def container(gpus: int = 8, efa: int = 32, image: str = PINNED) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": "180", "memory": "1800Gi"}
    if gpus:
        limits[GPU_RESOURCE] = gpus
    if efa:
        limits[EFA_RESOURCE] = efa
    return {
        "name": "vllm",
        "image": image,
        "resources": {"requests": {"cpu": "180", "memory": "1800Gi"}, "limits": limits},
        "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
    }


def pod(c: dict[str, Any], shm: str | None = "16Gi", links: bool | None = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [c], "nodeSelector": {EFA_LABEL: "true"}}
    if shm is not None:
        spec["volumes"] = [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}}]
    if links is not None:
        spec["enableServiceLinks"] = links
    return {"metadata": {"labels": {"app": "engine"}}, "spec": spec}


def lws(
    leader: dict[str, Any] | None = None, worker: dict[str, Any] | None = None, size: int = 2
) -> dict[str, Any]:
    """A 2-node p5.48xlarge group: 8 GPUs and 32 EFA interfaces per pod."""
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": "qwen3-vl-235b"},
        "spec": {
            "replicas": 1,
            "leaderWorkerTemplate": {
                "size": size,
                "leaderTemplate": leader or pod(container()),
                "workerTemplate": worker or pod(container()),
            },
        },
    }


def deployment(template: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {"replicas": 1, "template": template},
    }


def service(
    name: str, port: int, annotations: dict[str, str] | None = None, typ: str = "LoadBalancer"
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {
            "type": typ,
            "selector": {"app.kubernetes.io/name": name},
            "ports": [{"port": port}],
        },
    }


NGINX = """
http {
    client_max_body_size 64m;
    server {
        listen 8080;
        location /v1/ {
            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_pass http://qwen3-vl-2b;
        }
    }
}
"""


def config_map(text: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "gateway"},
        "data": {"nginx.conf": text},
    }


# --- one rule at a time ------------------------------------------------------------------------------


def test_shm_compliant_multi_node_group() -> None:
    assert check("gpu-pods-have-shm", LWS_TYPE, lws()) == []


def test_shm_below_the_planner_minimum() -> None:
    small = pod(container(), shm="8Gi")
    found = check("gpu-pods-have-shm", LWS_TYPE, lws(worker=small))
    # 8 GPUs per node: the planner's minimum is 2 GiB per GPU = 16 GiB
    assert found == [
        "LeaderWorkerSet qwen3-vl-235b worker: 8 GPU(s) per pod x 2 pod(s) per group need an "
        "in-memory /dev/shm of at least 16.0 GiB (found 8.0 GiB); NCCL and vLLM's shared-memory "
        "queues die with bus errors in the 64 MiB default. Mount an emptyDir {medium: Memory, "
        "sizeLimit: 16Gi} at /dev/shm."
    ]


def test_shm_missing_on_a_tensor_parallel_deployment() -> None:
    tp4 = pod(container(gpus=4, efa=0), shm=None)
    found = check("gpu-pods-have-shm", "kubernetes:apps/v1:Deployment", deployment(tp4))
    assert len(found) == 1
    assert (
        "4 GPU(s) per pod x 1 pod(s) per group need an in-memory /dev/shm of at least 8.0 GiB (found none)"
        in found[0]
    )


def test_shm_on_disk_does_not_count() -> None:
    on_disk = pod(container(gpus=4, efa=0))
    on_disk["spec"]["volumes"] = [{"name": "shm", "emptyDir": {"sizeLimit": "64Gi"}}]
    assert (
        len(check("gpu-pods-have-shm", "kubernetes:apps/v1:Deployment", deployment(on_disk))) == 1
    )


def test_shm_not_required_for_a_single_gpu_pod() -> None:
    one = pod(container(gpus=1, efa=0), shm=None)
    assert check("gpu-pods-have-shm", "kubernetes:apps/v1:Deployment", deployment(one)) == []


def test_efa_compliant_group() -> None:
    assert check("efa-on-leader-and-workers", LWS_TYPE, lws()) == []


def test_efa_missing_on_the_workers() -> None:
    found = check("efa-on-leader-and-workers", LWS_TYPE, lws(worker=pod(container(efa=0))))
    assert len(found) == 1
    assert found[0].startswith(
        "LeaderWorkerSet qwen3-vl-235b worker: a multi-node group on EFA nodes must request "
        "vpc.amazonaws.com/efa on the leader AND the workers"
    )


def test_efa_missing_on_the_leader_of_a_group_that_selects_efa_nodes() -> None:
    found = check(
        "efa-on-leader-and-workers",
        LWS_TYPE,
        lws(leader=pod(container(efa=0)), worker=pod(container(efa=0))),
    )
    assert [m.split(":")[0] for m in found] == [
        "LeaderWorkerSet qwen3-vl-235b leader",
        "LeaderWorkerSet qwen3-vl-235b worker",
    ]


def test_efa_counts_must_match() -> None:
    found = check("efa-on-leader-and-workers", LWS_TYPE, lws(worker=pod(container(efa=16))))
    assert len(found) == 1
    assert found[0].startswith("EFA interfaces differ between leader and workers")


def test_efa_not_required_off_efa_nodes() -> None:
    tcp = pod(container(efa=0))
    del tcp["spec"]["nodeSelector"]
    assert (
        check("efa-on-leader-and-workers", LWS_TYPE, lws(leader=tcp, worker=copy.deepcopy(tcp)))
        == []
    )


def test_service_named_vllm() -> None:
    found = check(
        "no-service-named-vllm",
        "kubernetes:core/v1:Service",
        service("vllm", 8000, typ="ClusterIP"),
    )
    assert len(found) == 1
    assert "VLLM_PORT" in found[0]
    assert (
        check(
            "no-service-named-vllm",
            "kubernetes:core/v1:Service",
            service("qwen3-vl-2b-leader", 8000, typ="ClusterIP"),
        )
        == []
    )


def test_engine_pods_need_service_links_off() -> None:
    on = deployment(pod(container(gpus=1, efa=0), links=None))
    assert len(check("engine-service-links-off", "kubernetes:apps/v1:Deployment", on)) == 1
    off = deployment(pod(container(gpus=1, efa=0), links=False))
    assert check("engine-service-links-off", "kubernetes:apps/v1:Deployment", off) == []
    assert (
        len(check("engine-service-links-off", LWS_TYPE, lws(worker=pod(container(), links=True))))
        == 1
    )


def test_cpu_pods_may_keep_service_links() -> None:
    cpu = deployment(pod(container(gpus=0, efa=0), links=None))
    assert check("engine-service-links-off", "kubernetes:apps/v1:Deployment", cpu) == []


@pytest.mark.parametrize(
    ("stack", "image", "config", "violations"),
    [
        pytest.param("prod", "nginx:1.28.0", None, 1, id="prod-tag"),
        pytest.param("prod", "nginx:1.28.0@sha256:" + "0" * 64, None, 0, id="prod-digest"),
        pytest.param("dev", "nginx:1.28.0", None, 0, id="dev-tag"),
        pytest.param(
            "staging", "nginx:1.28.0", {"stacks": ["staging", "prod"]}, 1, id="configured"
        ),
        pytest.param("prod", "nginx:1.28.0@sha256:abc", None, 1, id="short-digest"),
    ],
)
def test_images_pinned_by_digest(
    stack: str, image: str, config: dict[str, Any] | None, violations: int
) -> None:
    d = deployment(pod(container(gpus=0, efa=0, image=image)))
    assert (
        len(
            check(
                "images-pinned-by-digest",
                "kubernetes:apps/v1:Deployment",
                d,
                stack=stack,
                config=config,
            )
        )
        == violations
    )


def test_init_containers_are_pinned_too() -> None:
    d = deployment(pod(container(gpus=0, efa=0)))
    d["spec"]["template"]["spec"]["initContainers"] = [{"name": "fetch", "image": "busybox:1.36"}]
    found = check("images-pinned-by-digest", "kubernetes:apps/v1:Deployment", d)
    assert found[0].startswith("Deployment d pod: container fetch runs 'busybox:1.36'")


@pytest.mark.parametrize(
    ("svc", "violations"),
    [
        pytest.param(service("redis", 6379), 1, id="redis-public"),
        pytest.param(service("cache", 6379), 1, id="redis-port"),
        pytest.param(service("grafana", 80), 1, id="grafana-name"),
        pytest.param(
            service(
                "redis", 6379, {"service.beta.kubernetes.io/aws-load-balancer-scheme": "internal"}
            ),
            0,
            id="redis-internal",
        ),
        pytest.param(
            service(
                "prometheus",
                9090,
                {"service.beta.kubernetes.io/aws-load-balancer-internal": "true"},
            ),
            0,
            id="legacy-internal",
        ),
        pytest.param(service("redis", 6379, typ="ClusterIP"), 0, id="cluster-ip"),
        pytest.param(service("gateway", 80), 0, id="gateway-may-be-public"),
    ],
)
def test_data_services_stay_internal(svc: dict[str, Any], violations: int) -> None:
    assert (
        len(check("no-internet-facing-data-services", "kubernetes:core/v1:Service", svc))
        == violations
    )


def test_helm_values_cannot_expose_grafana() -> None:
    values: dict[str, Any] = {"grafana": {"service": {"type": "LoadBalancer"}}}
    release = {"chart": "kube-prometheus-stack", "version": "75.0.0", "values": values}
    assert (
        len(check("no-internet-facing-data-services", "kubernetes:helm.sh/v3:Release", release))
        == 1
    )
    values["grafana"]["service"]["annotations"] = {
        "service.beta.kubernetes.io/aws-load-balancer-scheme": "internal"
    }
    assert check("no-internet-facing-data-services", "kubernetes:helm.sh/v3:Release", release) == []


@pytest.mark.parametrize(
    ("text", "violations"),
    [
        pytest.param(NGINX, 0, id="compliant"),
        pytest.param(NGINX.replace("proxy_buffering off;", ""), 1, id="buffering-default"),
        pytest.param(
            NGINX.replace("proxy_buffering off;", "# proxy_buffering off;"), 1, id="commented-out"
        ),
        pytest.param(
            NGINX.replace("listen 8080;", "listen 8080; proxy_buffering on;"), 1, id="buffering-on"
        ),
        pytest.param(NGINX.replace("64m", "1m"), 1, id="body-1m"),
        pytest.param(NGINX.replace("client_max_body_size 64m;", ""), 1, id="body-default"),
        pytest.param(NGINX.replace("64m", "10240k"), 0, id="body-10m-in-k"),
        pytest.param(
            NGINX.replace("listen 8080;", "listen 8080; client_max_body_size 2m;"),
            1,
            id="body-lowered-in-server",
        ),
    ],
)
def test_gateway_config(text: str, violations: int) -> None:
    assert (
        len(
            check(
                "gateway-streams-and-takes-images", "kubernetes:core/v1:ConfigMap", config_map(text)
            )
        )
        == violations
    )


def test_config_maps_without_a_proxy_are_ignored() -> None:
    assert (
        check(
            "gateway-streams-and-takes-images",
            "kubernetes:core/v1:ConfigMap",
            config_map("maxmemory 1gb\n"),
        )
        == []
    )


def efa_template(groups: list[str], placement: dict[str, str] | None = None) -> dict[str, Any]:
    props: dict[str, Any] = {
        "networkInterfaces": [
            {
                "deviceIndex": 0,
                "networkCardIndex": 0,
                "interfaceType": "efa",
                "securityGroups": groups,
            },
            {
                "deviceIndex": 1,
                "networkCardIndex": 1,
                "interfaceType": "efa-only",
                "securityGroups": groups,
            },
        ]
    }
    if placement is not None:
        props["placement"] = placement
    return props


def sg_rule(direction: str, sg: str, referenced: str, protocol: str = "-1") -> PolicyResource:
    typ = f"aws:vpc/securityGroup{direction}Rule:SecurityGroup{direction}Rule"
    props = {"securityGroupId": sg, "referencedSecurityGroupId": referenced, "ipProtocol": protocol}
    return policy_resource(typ, f"efa-{direction.lower()}", props)


LT_TYPE = "aws:ec2/launchTemplate:LaunchTemplate"


def test_efa_security_group_self_referencing_both_ways() -> None:
    lt = policy_resource(LT_TYPE, "lt", efa_template(["sg-efa", "sg-cluster"]))
    both = [lt, sg_rule("Ingress", "sg-efa", "sg-efa"), sg_rule("Egress", "sg-efa", "sg-efa")]
    assert check_stack("efa-security-group-self-referencing", both) == []


@pytest.mark.parametrize(
    "rules",
    [
        pytest.param([("Ingress", "sg-efa", "sg-efa", "-1")], id="ingress-only"),
        pytest.param(
            [("Ingress", "sg-efa", "sg-efa", "-1"), ("Egress", "sg-efa", "sg-other", "-1")],
            id="egress-elsewhere",
        ),
        pytest.param(
            [("Ingress", "sg-efa", "sg-efa", "tcp"), ("Egress", "sg-efa", "sg-efa", "-1")],
            id="tcp-only",
        ),
    ],
)
def test_efa_security_group_violations(rules: list[tuple[str, str, str, str]]) -> None:
    lt = policy_resource(LT_TYPE, "lt", efa_template(["sg-efa"]))
    found = check_stack("efa-security-group-self-referencing", [lt, *(sg_rule(*r) for r in rules)])
    # both EFA interfaces of the template are reported
    assert [m.split(":")[0] for m in found] == ["launch template lt", "launch template lt"]


def test_legacy_security_group_rules_with_self_count() -> None:
    lt = policy_resource(LT_TYPE, "lt", efa_template(["sg-efa"]))
    legacy = [
        policy_resource(
            "aws:ec2/securityGroupRule:SecurityGroupRule",
            f"r-{t}",
            {
                "type": t,
                "securityGroupId": "sg-efa",
                "self": True,
                "protocol": "-1",
                "fromPort": 0,
                "toPort": 0,
            },
        )
        for t in ("ingress", "egress")
    ]
    assert check_stack("efa-security-group-self-referencing", [lt, *legacy]) == []


def test_efa_launch_template_in_a_placement_group() -> None:
    assert len(check("efa-in-cluster-placement-group", LT_TYPE, efa_template(["sg"]))) == 1
    placed = efa_template(["sg"], {"groupName": "h100-efa-pg"})
    assert check("efa-in-cluster-placement-group", LT_TYPE, placed) == []
    plain = {"networkInterfaces": [{"deviceIndex": 0, "associatePublicIpAddress": "false"}]}
    assert check("efa-in-cluster-placement-group", LT_TYPE, plain) == []


def test_placement_groups_use_the_cluster_strategy() -> None:
    typ = "aws:ec2/placementGroup:PlacementGroup"
    assert len(check("efa-in-cluster-placement-group", typ, {"strategy": "spread"})) == 1
    assert check("efa-in-cluster-placement-group", typ, {"strategy": "cluster"}) == []


def test_containers_have_requests_and_limits() -> None:
    bare = container(gpus=0, efa=0)
    bare["resources"] = {"requests": {"cpu": "1"}}
    found = check(
        "containers-have-requests-and-limits",
        "kubernetes:apps/v1:Deployment",
        deployment(pod(bare)),
    )
    assert found == [
        "Deployment d pod: container vllm has no resources requests.memory, limits.memory; the "
        "scheduler packs it blindly and the OOM killer picks it first."
    ]
    full = deployment(pod(container(gpus=0, efa=0)))
    assert check("containers-have-requests-and-limits", "kubernetes:apps/v1:Deployment", full) == []


def test_every_policy_has_an_enforcement_level_and_a_unique_name() -> None:
    assert len(BY_NAME) == len(POLICIES) == 10
    assert all(p.enforcement_level is not None for p in POLICIES)


# --- every stack ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=STACKS)
def stack_run(request: pytest.FixtureRequest) -> StackRun:
    return run_stack(request.param)


# The analyzer unwraps secret-marked values (a pod spec holding a secret reference arrives
# wrapped on the wire) before any policy sees them; so do the tests.
def _validation_args(r: Resource) -> ResourceValidationArgs:
    return ResourceValidationArgs(
        r.type, deserialize_properties(r.inputs), r.urn, r.name, OPTS, None
    )


def _policy_resource(r: Resource) -> PolicyResource:
    props = deserialize_properties(r.inputs)
    return PolicyResource(r.type, props, r.urn, r.name, OPTS, None, None, [], {})


def test_every_stack_complies_with_every_policy(stack_run: StackRun) -> None:
    found: list[str] = []
    for rule in POLICIES:
        if isinstance(rule, ResourceValidationPolicy):
            for r in stack_run.resources:
                rule.validate(
                    _validation_args(r),
                    lambda m, _u=None, r=r, rule=rule: found.append(
                        f"{rule.name}: {r.type} {r.name}: {m}"
                    ),
                )
        else:
            resources = [_policy_resource(r) for r in stack_run.resources]
            rule.validate(
                StackValidationArgs(resources),
                lambda m, _u=None, rule=rule: found.append(f"{rule.name}: {m}"),
            )
    assert found == []


def test_the_policies_see_what_they_guard(stack_run: StackRun) -> None:
    """A stack without engines or gateway would comply vacuously; make sure they are there."""
    kinds = {r.inputs.get("kind") for r in stack_run.kubernetes()}
    assert "LeaderWorkerSet" in kinds
    config_maps = stack_run.of_type("kubernetes:core/v1:ConfigMap")
    assert any(
        "proxy_pass" in str(v) for c in config_maps for v in (c.inputs.get("data") or {}).values()
    )
    if stack_run.stack != "dev":  # staging and prod have EFA groups
        templates = stack_run.of_type(LT_TYPE)
        assert any(
            i.get("interfaceType") == "efa"
            for t in templates
            for i in t.inputs.get("networkInterfaces", [])
        )
