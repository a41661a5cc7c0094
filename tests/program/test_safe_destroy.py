"""`pulumi destroy` cannot lose prod data by accident, and tears stacks down in the right order.

Asserted on the resource options the recording mock monitor captured for each stack
(protect, retainOnDelete, provider, parent, dependencies). Pulumi deletes a resource
only after everything that depends on it (explicitly, through an input, through its
provider or as its child) is gone, so "A is deleted before B" is "B is in A's
dependency closure".
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from pulumi_policy.deserialize import deserialize_properties

from stacks.naming import NAME_LABEL, REDIS_NAME
from tests.support.harness import ROOT, Resource, StackRun, run_stack

STACKS = ["dev", "staging", "prod"]
CLUSTER = "aws:eks/cluster:Cluster"
NODE_GROUP = "aws:eks/nodeGroup:NodeGroup"
K8S_PROVIDER = "pulumi:providers:kubernetes"
STORAGE_CLASS = "kubernetes:storage.k8s.io/v1:StorageClass"
PVC = "kubernetes:core/v1:PersistentVolumeClaim"
HELM_RELEASE = "kubernetes:helm.sh/v3:Release"
# Kinds whose pods must be gone before the nodes they run on.
WORKLOAD_KINDS = frozenset(
    {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "LeaderWorkerSet"}
)
KEEP_ANNOTATION = {"helm.sh/resource-policy": "keep"}


@pytest.fixture(scope="module")
def runs() -> dict[str, StackRun]:
    return {stack: run_stack(stack) for stack in STACKS}


@pytest.fixture(scope="module")
def prod_with_webui(tmp_path_factory: pytest.TempPathFactory) -> StackRun:
    """prod with its web UI on: prod as committed creates no PersistentVolumeClaim itself."""
    text = (ROOT / "Pulumi.prod.yaml").read_text()
    webui_off = "    enabled: false\n    image: ghcr.io/open-webui/"
    assert webui_off in text
    path = tmp_path_factory.mktemp("prod") / "Pulumi.prod.yaml"
    path.write_text(text.replace(webui_off, "    image: ghcr.io/open-webui/"))
    return run_stack("prod", path)


def props(r: Resource) -> Mapping[str, Any]:
    """Inputs with secret-marked values unwrapped, as the engine's analyzers see them."""
    return deserialize_properties(r.inputs)


def type_of(urn: str) -> str:
    # urn:pulumi:<stack>::<project>::<parent types$...$type>::<name>
    return urn.split("::")[2].split("$")[-1]


def provider_urn(r: Resource) -> str:
    # The provider reference is "<provider urn>::<provider id>".
    return r.provider.rsplit("::", 1)[0] if r.provider else ""


def closure(run: StackRun, r: Resource) -> set[str]:
    """URNs of everything `r` depends on, directly or not, through inputs, provider or parent."""
    by_urn = {x.urn: x for x in run.resources}
    seen: set[str] = set()
    todo = [r]
    while todo:
        current = todo.pop()
        for urn in [*current.dependencies, provider_urn(current), current.parent]:
            if urn and urn not in seen:
                seen.add(urn)
                if urn in by_urn:
                    todo.append(by_urn[urn])
    return seen


def types_in(urns: set[str]) -> set[str]:
    return {type_of(u) for u in urns}


def storage_class(run: StackRun, name: str) -> Mapping[str, Any]:
    found = [
        props(r) for r in run.of_type(STORAGE_CLASS) if props(r)["metadata"].get("name") == name
    ]
    assert len(found) == 1, f"{run.stack}: expected the stack to create StorageClass {name!r}"
    return found[0]


def redis_statefulset(run: StackRun) -> Resource:
    found = [
        r
        for r in run.of_type("kubernetes:apps/v1:StatefulSet")
        if props(r)["metadata"].get("labels", {}).get(NAME_LABEL) == REDIS_NAME
    ]
    assert len(found) == 1, f"{run.stack}: expected one Redis StatefulSet"
    return found[0]


def prometheus_release(run: StackRun) -> Resource:
    found = [
        r for r in run.of_type(HELM_RELEASE) if props(r).get("chart") == "kube-prometheus-stack"
    ]
    assert len(found) == 1, f"{run.stack}: expected one kube-prometheus-stack release"
    return found[0]


def kubernetes_resources(run: StackRun) -> Iterator[Resource]:
    return (r for r in run.resources if r.custom and r.type.startswith("kubernetes:"))


# --- prod keeps its data -----------------------------------------------------------------------------


def test_prod_cluster_is_protected(runs: dict[str, StackRun]) -> None:
    clusters = runs["prod"].of_type(CLUSTER)
    assert clusters, "prod creates its EKS cluster (cluster.mode new)"
    assert all(c.protect for c in clusters)


def test_prod_redis_volume_is_protected_and_retained(runs: dict[str, StackRun]) -> None:
    run = runs["prod"]
    redis = redis_statefulset(run)
    assert (redis.protect, redis.retain_on_delete) == (True, True)
    spec = props(redis)["spec"]
    # Deleting the StatefulSet must leave its claim (and so the EBS volume) in place.
    assert spec["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    claims = spec["volumeClaimTemplates"]
    assert claims, "Redis keeps its AOF on a PVC"
    for claim in claims:
        assert storage_class(run, claim["spec"]["storageClassName"])["reclaimPolicy"] == "Retain"


def test_prod_prometheus_volume_is_protected_and_retained(runs: dict[str, StackRun]) -> None:
    run = runs["prod"]
    release = prometheus_release(run)
    assert release.protect
    spec = props(release)["values"]["prometheus"]["prometheusSpec"]
    assert spec["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    claim = spec["storageSpec"]["volumeClaimTemplate"]["spec"]
    assert storage_class(run, claim["storageClassName"])["reclaimPolicy"] == "Retain"


def test_prod_grafana_volume_is_protected_and_retained(runs: dict[str, StackRun]) -> None:
    run = runs["prod"]
    release = prometheus_release(run)
    assert release.protect
    persistence = props(release)["values"]["grafana"]["persistence"]
    assert persistence["enabled"] is True
    # The chart creates Grafana's claim itself; `keep` stops Helm deleting it with the release.
    assert persistence["annotations"].items() >= KEEP_ANNOTATION.items()
    assert storage_class(run, persistence["storageClassName"])["reclaimPolicy"] == "Retain"


def test_prod_claims_and_storage_classes_are_protected(prod_with_webui: StackRun) -> None:
    run = prod_with_webui
    claims = run.of_type(PVC)
    assert claims, "the web UI keeps its data on a claim of its own"
    for claim in claims:
        assert (claim.protect, claim.retain_on_delete) == (True, True), claim.name
        assert (
            storage_class(run, props(claim)["spec"]["storageClassName"])["reclaimPolicy"]
            == "Retain"
        )
    classes = run.of_type(STORAGE_CLASS)
    assert classes
    assert all(c.protect for c in classes if props(c).get("reclaimPolicy") == "Retain")


@pytest.mark.parametrize("stack", ["dev", "staging"])
def test_non_prod_stacks_destroy_cleanly(runs: dict[str, StackRun], stack: str) -> None:
    """Nothing protected (destroy.yml can run) and no volume left behind to pay for."""
    run = runs[stack]
    assert [r.name for r in run.resources if r.protect] == []
    assert run.of_type(STORAGE_CLASS), "Redis, monitoring and the web UI bring storage classes"
    assert {
        props(c)["metadata"]["name"]: props(c).get("reclaimPolicy", "Delete")
        for c in run.of_type(STORAGE_CLASS)
    } == {props(c)["metadata"]["name"]: "Delete" for c in run.of_type(STORAGE_CLASS)}


# --- teardown order -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_every_kubernetes_resource_uses_the_cluster_provider(
    runs: dict[str, StackRun], stack: str
) -> None:
    run = runs[stack]
    resources = list(kubernetes_resources(run))
    assert resources
    wrong = [r.name for r in resources if type_of(provider_urn(r) or "x::x::x") != K8S_PROVIDER]
    assert wrong == [], (
        "these use the default provider, so destroy may delete them after the cluster"
    )
    by_urn = {r.urn: r for r in run.resources}
    for urn in {provider_urn(r) for r in resources}:
        assert CLUSTER in types_in(closure(run, by_urn[urn])), (
            f"{urn} is not built from the cluster"
        )


@pytest.mark.parametrize("stack", STACKS)
def test_workloads_go_before_the_node_groups(runs: dict[str, StackRun], stack: str) -> None:
    run = runs[stack]
    workloads = [
        r
        for r in kubernetes_resources(run)
        if props(r).get("kind") in WORKLOAD_KINDS or r.type == HELM_RELEASE
    ]
    assert workloads
    orphaned = [r.name for r in workloads if NODE_GROUP not in types_in(closure(run, r))]
    assert orphaned == [], (
        "deleting the node groups first would strand these pods (and PDBs block drains)"
    )


@pytest.mark.parametrize("stack", STACKS)
def test_node_groups_go_before_the_cluster(runs: dict[str, StackRun], stack: str) -> None:
    run = runs[stack]
    groups = run.of_type(NODE_GROUP)
    assert groups
    assert all(CLUSTER in types_in(closure(run, g)) for g in groups)


@pytest.mark.parametrize("stack", STACKS)
def test_load_balancers_go_before_the_vpc(runs: dict[str, StackRun], stack: str) -> None:
    """The NLB behind a LoadBalancer Service holds ENIs in the subnets: it must go first."""
    run = runs[stack]
    balanced = [
        r
        for r in run.of_type("kubernetes:core/v1:Service")
        if props(r).get("spec", {}).get("type") == "LoadBalancer"
    ]
    assert balanced, "the gateway is exposed through a Service of type LoadBalancer"
    for service in balanced:
        reached = types_in(closure(run, service))
        assert {K8S_PROVIDER, CLUSTER, "aws:ec2/subnet:Subnet", "aws:ec2/vpc:Vpc"} <= reached, (
            service.name
        )
