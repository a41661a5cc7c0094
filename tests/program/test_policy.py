"""The policy pack as the Pulumi CLI runs it: each rule on a violating and a compliant input,
then on the mocked resources of every stack, then on prod's with one guarded setting broken.

policy/__main__.py runs as its own process, as `--policy-pack policy` starts it: it builds
the PolicyPack and serves the analyzer protocol, and every check here is an Analyze or
AnalyzeStack call over gRPC. The rules therefore see their inputs as the CLI hands them over
(a protobuf Struct, read back through pulumi_policy's unknown-checking proxies, numbers as
floats), not as the plain dicts and lists a direct call would pass.
"""

from __future__ import annotations

import copy
import functools
import select
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2, struct_pb2
from pulumi.runtime.proto import analyzer_pb2 as pb
from pulumi.runtime.proto import analyzer_pb2_grpc

from stacks.naming import EFA_LABEL, EFA_RESOURCE, GPU_RESOURCE
from tests.support.harness import ROOT, Resource, StackRun, run_stack
from tests.support.local import stop

STACKS = ["dev", "staging", "prod"]
PINNED = "vllm/vllm-openai:v0.33.0@sha256:" + "ab" * 32
LWS_TYPE = "kubernetes:leaderworkerset.x-k8s.io/v1:LeaderWorkerSet"
PACK_START_TIMEOUT_S = 60.0
RPC_TIMEOUT_S = 30.0

Props = dict[str, Any]
Item = tuple[str, str, Props]  # (type, name, inputs) of one resource in a stack


def urn(stack: str, typ: str, name: str) -> str:
    return f"urn:pulumi:{stack}::qwen-vl-serving::{typ}::{name}"


def struct(props: Mapping[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(props)
    return message


@dataclass(frozen=True)
class Pack:
    """The served policy pack, spoken to over the analyzer protocol."""

    stub: analyzer_pb2_grpc.AnalyzerStub

    def analyze(self, typ: str, name: str, urn_: str, props: Mapping[str, Any]) -> list[str]:
        """`policy: message` for every violation the resource policies report."""
        request = pb.AnalyzeRequest(type=typ, properties=struct(props), urn=urn_, name=name)
        return _violations(self.stub.Analyze(request, timeout=RPC_TIMEOUT_S))

    def analyze_stack(self, resources: Sequence[tuple[str, str, str, Props]]) -> list[str]:
        request = pb.AnalyzeStackRequest(
            resources=[
                pb.AnalyzerResource(type=typ, properties=struct(props), urn=urn_, name=name)
                for typ, name, urn_, props in resources
            ]
        )
        return _violations(self.stub.AnalyzeStack(request, timeout=RPC_TIMEOUT_S))

    def configure(self, config: Mapping[str, Mapping[str, Any]]) -> None:
        """Policy config, as `--policy-pack-config` passes it (the whole of it, every time)."""
        each = {name: pb.PolicyConfig(properties=struct(c)) for name, c in config.items()}
        self.stub.Configure(pb.ConfigureAnalyzerRequest(policyConfig=each), timeout=RPC_TIMEOUT_S)

    def policies(self) -> dict[str, str]:
        """Every policy the pack declares, with its enforcement level, as the CLI lists them."""
        info = self.stub.GetAnalyzerInfo(empty_pb2.Empty(), timeout=RPC_TIMEOUT_S)
        return {p.name: pb.EnforcementLevel.Name(p.enforcementLevel) for p in info.policies}


def _violations(response: pb.AnalyzeResponse) -> list[str]:
    # The analyzer puts the policy's description first, then the reported message.
    return [
        f"{d.policyName}: {d.message.removeprefix(d.description + chr(10))}"
        for d in response.diagnostics
    ]


@pytest.fixture(scope="module")
def pack() -> Iterator[Pack]:
    """policy/__main__.py started as the CLI starts it; it prints its port, then serves."""
    proc = subprocess.Popen(
        [sys.executable, "__main__.py"], cwd=ROOT / "policy", stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], PACK_START_TIMEOUT_S)
        port = proc.stdout.readline().strip() if ready else ""
        assert port.isdigit(), f"the policy pack did not start (exit {proc.poll()})"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Pack(analyzer_pb2_grpc.AnalyzerStub(channel))
    finally:
        stop(proc, timeout=10)


def check(
    pack: Pack,
    policy: str,
    typ: str,
    props: Mapping[str, Any],
    *,
    stack: str = "prod",
    config: Mapping[str, Any] | None = None,
    name: str = "r",
) -> list[str]:
    """What one policy reports for one resource."""
    if config is not None:
        pack.configure({policy: config})
    try:
        found = pack.analyze(typ, name, urn(stack, typ, name), props)
    finally:
        if config is not None:
            pack.configure({})
    return [v.removeprefix(f"{policy}: ") for v in found if v.startswith(f"{policy}: ")]


def check_stack(pack: Pack, policy: str, resources: Sequence[Item]) -> list[str]:
    found = pack.analyze_stack([(t, n, urn("prod", t, n), p) for t, n, p in resources])
    return [v.removeprefix(f"{policy}: ") for v in found if v.startswith(f"{policy}: ")]


def policy_resource(typ: str, name: str, props: Props) -> Item:
    return (typ, name, props)


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


def test_shm_compliant_multi_node_group(pack: Pack) -> None:
    assert check(pack, "gpu-pods-have-shm", LWS_TYPE, lws()) == []


def test_shm_below_the_planner_minimum(pack: Pack) -> None:
    small = pod(container(), shm="8Gi")
    found = check(pack, "gpu-pods-have-shm", LWS_TYPE, lws(worker=small))
    # 8 GPUs per node: the planner's minimum is 2 GiB per GPU = 16 GiB
    assert found == [
        "LeaderWorkerSet qwen3-vl-235b worker: 8 GPU(s) per pod x 2 pod(s) per group need an "
        "in-memory /dev/shm of at least 16.0 GiB (found 8.0 GiB); NCCL and vLLM's shared-memory "
        "queues die with bus errors in the 64 MiB default. Mount an emptyDir {medium: Memory, "
        "sizeLimit: 16Gi} at /dev/shm."
    ]


def test_shm_missing_on_a_tensor_parallel_deployment(pack: Pack) -> None:
    tp4 = pod(container(gpus=4, efa=0), shm=None)
    found = check(pack, "gpu-pods-have-shm", "kubernetes:apps/v1:Deployment", deployment(tp4))
    assert len(found) == 1
    assert (
        "4 GPU(s) per pod x 1 pod(s) per group need an in-memory /dev/shm of at least 8.0 GiB (found none)"
        in found[0]
    )


def test_shm_on_disk_does_not_count(pack: Pack) -> None:
    on_disk = pod(container(gpus=4, efa=0))
    on_disk["spec"]["volumes"] = [{"name": "shm", "emptyDir": {"sizeLimit": "64Gi"}}]
    assert (
        len(check(pack, "gpu-pods-have-shm", "kubernetes:apps/v1:Deployment", deployment(on_disk)))
        == 1
    )


def test_shm_not_required_for_a_single_gpu_pod(pack: Pack) -> None:
    one = pod(container(gpus=1, efa=0), shm=None)
    assert check(pack, "gpu-pods-have-shm", "kubernetes:apps/v1:Deployment", deployment(one)) == []


def test_efa_compliant_group(pack: Pack) -> None:
    assert check(pack, "efa-on-leader-and-workers", LWS_TYPE, lws()) == []


def test_efa_missing_on_the_workers(pack: Pack) -> None:
    found = check(pack, "efa-on-leader-and-workers", LWS_TYPE, lws(worker=pod(container(efa=0))))
    assert len(found) == 1
    assert found[0].startswith(
        "LeaderWorkerSet qwen3-vl-235b worker: a multi-node group on EFA nodes must request "
        "vpc.amazonaws.com/efa on the leader AND the workers"
    )


def test_efa_missing_on_the_leader_of_a_group_that_selects_efa_nodes(pack: Pack) -> None:
    found = check(
        pack,
        "efa-on-leader-and-workers",
        LWS_TYPE,
        lws(leader=pod(container(efa=0)), worker=pod(container(efa=0))),
    )
    assert [m.split(":")[0] for m in found] == [
        "LeaderWorkerSet qwen3-vl-235b leader",
        "LeaderWorkerSet qwen3-vl-235b worker",
    ]


def test_efa_counts_must_match(pack: Pack) -> None:
    found = check(pack, "efa-on-leader-and-workers", LWS_TYPE, lws(worker=pod(container(efa=16))))
    assert len(found) == 1
    assert found[0].startswith("EFA interfaces differ between leader and workers")


def test_efa_not_required_off_efa_nodes(pack: Pack) -> None:
    tcp = pod(container(efa=0))
    del tcp["spec"]["nodeSelector"]
    assert (
        check(
            pack, "efa-on-leader-and-workers", LWS_TYPE, lws(leader=tcp, worker=copy.deepcopy(tcp))
        )
        == []
    )


def test_service_named_vllm(pack: Pack) -> None:
    found = check(
        pack,
        "no-service-named-vllm",
        "kubernetes:core/v1:Service",
        service("vllm", 8000, typ="ClusterIP"),
    )
    assert len(found) == 1
    assert "VLLM_PORT" in found[0]
    assert (
        check(
            pack,
            "no-service-named-vllm",
            "kubernetes:core/v1:Service",
            service("qwen3-vl-2b-leader", 8000, typ="ClusterIP"),
        )
        == []
    )


def test_engine_pods_need_service_links_off(pack: Pack) -> None:
    on = deployment(pod(container(gpus=1, efa=0), links=None))
    assert len(check(pack, "engine-service-links-off", "kubernetes:apps/v1:Deployment", on)) == 1
    off = deployment(pod(container(gpus=1, efa=0), links=False))
    assert check(pack, "engine-service-links-off", "kubernetes:apps/v1:Deployment", off) == []
    assert (
        len(
            check(
                pack, "engine-service-links-off", LWS_TYPE, lws(worker=pod(container(), links=True))
            )
        )
        == 1
    )


def test_cpu_pods_may_keep_service_links(pack: Pack) -> None:
    cpu = deployment(pod(container(gpus=0, efa=0), links=None))
    assert check(pack, "engine-service-links-off", "kubernetes:apps/v1:Deployment", cpu) == []


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
    pack: Pack, stack: str, image: str, config: dict[str, Any] | None, violations: int
) -> None:
    d = deployment(pod(container(gpus=0, efa=0, image=image)))
    assert (
        len(
            check(
                pack,
                "images-pinned-by-digest",
                "kubernetes:apps/v1:Deployment",
                d,
                stack=stack,
                config=config,
            )
        )
        == violations
    )


def test_init_containers_are_pinned_too(pack: Pack) -> None:
    d = deployment(pod(container(gpus=0, efa=0)))
    d["spec"]["template"]["spec"]["initContainers"] = [{"name": "fetch", "image": "busybox:1.36"}]
    found = check(pack, "images-pinned-by-digest", "kubernetes:apps/v1:Deployment", d)
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
def test_data_services_stay_internal(pack: Pack, svc: dict[str, Any], violations: int) -> None:
    assert (
        len(check(pack, "no-internet-facing-data-services", "kubernetes:core/v1:Service", svc))
        == violations
    )


def test_helm_values_cannot_expose_grafana(pack: Pack) -> None:
    values: dict[str, Any] = {"grafana": {"service": {"type": "LoadBalancer"}}}
    release = {"chart": "kube-prometheus-stack", "version": "75.0.0", "values": values}
    assert (
        len(
            check(
                pack, "no-internet-facing-data-services", "kubernetes:helm.sh/v3:Release", release
            )
        )
        == 1
    )
    values["grafana"]["service"]["annotations"] = {
        "service.beta.kubernetes.io/aws-load-balancer-scheme": "internal"
    }
    assert (
        check(pack, "no-internet-facing-data-services", "kubernetes:helm.sh/v3:Release", release)
        == []
    )


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
def test_gateway_config(pack: Pack, text: str, violations: int) -> None:
    assert (
        len(
            check(
                pack,
                "gateway-streams-and-takes-images",
                "kubernetes:core/v1:ConfigMap",
                config_map(text),
            )
        )
        == violations
    )


def test_config_maps_without_a_proxy_are_ignored(pack: Pack) -> None:
    assert (
        check(
            pack,
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


def sg_rule(direction: str, sg: str, referenced: str, protocol: str = "-1") -> Item:
    typ = f"aws:vpc/securityGroup{direction}Rule:SecurityGroup{direction}Rule"
    props = {"securityGroupId": sg, "referencedSecurityGroupId": referenced, "ipProtocol": protocol}
    return policy_resource(typ, f"efa-{direction.lower()}", props)


LT_TYPE = "aws:ec2/launchTemplate:LaunchTemplate"


def test_efa_security_group_self_referencing_both_ways(pack: Pack) -> None:
    lt = policy_resource(LT_TYPE, "lt", efa_template(["sg-efa", "sg-cluster"]))
    both = [lt, sg_rule("Ingress", "sg-efa", "sg-efa"), sg_rule("Egress", "sg-efa", "sg-efa")]
    assert check_stack(pack, "efa-security-group-self-referencing", both) == []


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
def test_efa_security_group_violations(pack: Pack, rules: list[tuple[str, str, str, str]]) -> None:
    lt = policy_resource(LT_TYPE, "lt", efa_template(["sg-efa"]))
    found = check_stack(
        pack, "efa-security-group-self-referencing", [lt, *(sg_rule(*r) for r in rules)]
    )
    # both EFA interfaces of the template are reported
    assert [m.split(":")[0] for m in found] == ["launch template lt", "launch template lt"]


def test_legacy_security_group_rules_with_self_count(pack: Pack) -> None:
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
    assert check_stack(pack, "efa-security-group-self-referencing", [lt, *legacy]) == []


def test_efa_launch_template_in_a_placement_group(pack: Pack) -> None:
    assert len(check(pack, "efa-in-cluster-placement-group", LT_TYPE, efa_template(["sg"]))) == 1
    placed = efa_template(["sg"], {"groupName": "h100-efa-pg"})
    assert check(pack, "efa-in-cluster-placement-group", LT_TYPE, placed) == []
    plain = {"networkInterfaces": [{"deviceIndex": 0, "associatePublicIpAddress": "false"}]}
    assert check(pack, "efa-in-cluster-placement-group", LT_TYPE, plain) == []


def test_placement_groups_use_the_cluster_strategy(pack: Pack) -> None:
    typ = "aws:ec2/placementGroup:PlacementGroup"
    assert len(check(pack, "efa-in-cluster-placement-group", typ, {"strategy": "spread"})) == 1
    assert check(pack, "efa-in-cluster-placement-group", typ, {"strategy": "cluster"}) == []


def test_containers_have_requests_and_limits(pack: Pack) -> None:
    bare = container(gpus=0, efa=0)
    bare["resources"] = {"requests": {"cpu": "1"}}
    found = check(
        pack,
        "containers-have-requests-and-limits",
        "kubernetes:apps/v1:Deployment",
        deployment(pod(bare)),
    )
    assert found == [
        "Deployment d pod: container vllm has no resources requests.memory, limits.memory; the "
        "scheduler packs it blindly and the OOM killer picks it first."
    ]
    full = deployment(pod(container(gpus=0, efa=0)))
    assert (
        check(pack, "containers-have-requests-and-limits", "kubernetes:apps/v1:Deployment", full)
        == []
    )


def test_the_pack_declares_every_policy_at_its_documented_level(pack: Pack) -> None:
    # The table in docs/delivery.md: everything mandatory but the resources hygiene rule.
    assert pack.policies() == {
        "gpu-pods-have-shm": "MANDATORY",
        "efa-on-leader-and-workers": "MANDATORY",
        "no-service-named-vllm": "MANDATORY",
        "engine-service-links-off": "MANDATORY",
        "images-pinned-by-digest": "MANDATORY",
        "no-internet-facing-data-services": "MANDATORY",
        "gateway-streams-and-takes-images": "MANDATORY",
        "efa-security-group-self-referencing": "MANDATORY",
        "efa-in-cluster-placement-group": "MANDATORY",
        "containers-have-requests-and-limits": "ADVISORY",
    }


# --- every stack ----------------------------------------------------------------------------------


@functools.cache
def run_of(stack: str) -> StackRun:
    return run_stack(stack)


@pytest.fixture(scope="module", params=STACKS)
def stack_run(request: pytest.FixtureRequest) -> StackRun:
    return run_of(request.param)


def wire_props(run: StackRun) -> list[tuple[Resource, Props]]:
    """Every resource with its inputs as the engine sends them (secrets still wrapped: the
    analyzer unwraps them), copied so that a test may change them."""
    return [(r, copy.deepcopy(r.inputs)) for r in run.resources]


def violations(pack: Pack, resources: list[tuple[Resource, Props]]) -> list[str]:
    """What the pack reports over a stack: each resource, then the stack as a whole."""
    found = [
        f"{v} [{r.type} {r.name}]"
        for r, props in resources
        for v in pack.analyze(r.type, r.name, r.urn, props)
    ]
    return found + pack.analyze_stack([(r.type, r.name, r.urn, p) for r, p in resources])


def test_every_stack_complies_with_every_policy(pack: Pack, stack_run: StackRun) -> None:
    assert violations(pack, wire_props(stack_run)) == []


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


# --- the same policies over prod's resources, each broken once ------------------------------------
# Each mutation breaks what one policy guards in the resources prod's program really
# registers; exactly that policy must object. This is what proves the rules read the
# resources' real wire shape (a rule that silently found nothing would pass above too).


def props_of(resources: list[tuple[Resource, Props]], name: str) -> Props:
    (props,) = [p for r, p in resources if r.name == name]
    return props


def lws_pod(resources: list[tuple[Resource, Props]], name: str, role: str) -> Props:
    return props_of(resources, name)["spec"]["leaderWorkerTemplate"][role]["spec"]


def gateway_pod(resources: list[tuple[Resource, Props]]) -> Props:
    return props_of(resources, "gateway-deployment")["spec"]["template"]["spec"]


def shrink_shm(resources: list[tuple[Resource, Props]]) -> None:
    volumes = lws_pod(resources, "qwen3-vl-235b-lws", "leaderTemplate")["volumes"]
    (shm,) = [v for v in volumes if v.get("emptyDir", {}).get("medium") == "Memory"]
    shm["emptyDir"]["sizeLimit"] = "64Mi"  # Docker's default, far below 8 GPUs' 16 GiB


def drop_worker_efa(resources: list[tuple[Resource, Props]]) -> None:
    (vllm,) = lws_pod(resources, "qwen3-vl-235b-lws", "workerTemplate")["containers"]
    for amounts in vllm["resources"].values():
        del amounts[EFA_RESOURCE]


def enable_service_links(resources: list[tuple[Resource, Props]]) -> None:
    lws_pod(resources, "qwen3-vl-2b-lws", "workerTemplate")["enableServiceLinks"] = True


def name_a_service_vllm(resources: list[tuple[Resource, Props]]) -> None:
    props_of(resources, "gateway-service")["metadata"]["name"] = "vllm"


def unpin_an_image(resources: list[tuple[Resource, Props]]) -> None:
    nginx = gateway_pod(resources)["containers"][0]
    nginx["image"] = nginx["image"].split("@", 1)[0]


def expose_redis(resources: list[tuple[Resource, Props]]) -> None:
    props_of(resources, "redis-service")["spec"]["type"] = "LoadBalancer"


def buffer_the_gateway(resources: list[tuple[Resource, Props]]) -> None:
    data = props_of(resources, "gateway-config")["data"]
    assert "proxy_buffering off;" in data["nginx.conf"]
    data["nginx.conf"] = data["nginx.conf"].replace("proxy_buffering off;", "proxy_buffering on;")


def drop_efa_egress(resources: list[tuple[Resource, Props]]) -> None:
    (egress,) = [
        i for i, (r, _) in enumerate(resources) if r.name == "gpu-h100-efa-efa-self-egress"
    ]
    del resources[egress]


def spread_the_placement_group(resources: list[tuple[Resource, Props]]) -> None:
    props_of(resources, "gpu-h100-efa-placement")["strategy"] = "spread"


def drop_gateway_resources(resources: list[tuple[Resource, Props]]) -> None:
    del gateway_pod(resources)["containers"][0]["resources"]


MUTATIONS: list[tuple[Callable[[list[tuple[Resource, Props]]], None], str]] = [
    (shrink_shm, "gpu-pods-have-shm"),
    (drop_worker_efa, "efa-on-leader-and-workers"),
    (enable_service_links, "engine-service-links-off"),
    (name_a_service_vllm, "no-service-named-vllm"),
    (unpin_an_image, "images-pinned-by-digest"),
    (expose_redis, "no-internet-facing-data-services"),
    (buffer_the_gateway, "gateway-streams-and-takes-images"),
    (drop_efa_egress, "efa-security-group-self-referencing"),
    (spread_the_placement_group, "efa-in-cluster-placement-group"),
    (drop_gateway_resources, "containers-have-requests-and-limits"),
]


@pytest.mark.parametrize(("mutate", "policy"), [pytest.param(*m, id=m[1]) for m in MUTATIONS])
def test_a_broken_prod_resource_is_caught(
    pack: Pack, mutate: Callable[[list[tuple[Resource, Props]]], None], policy: str
) -> None:
    resources = wire_props(run_of("prod"))
    mutate(resources)
    assert {v.split(":", 1)[0] for v in violations(pack, resources)} == {policy}


def test_every_policy_has_a_mutation(pack: Pack) -> None:
    assert sorted(policy for _, policy in MUTATIONS) == sorted(pack.policies())
