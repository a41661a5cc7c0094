"""Every Helm release the program installs, rendered by the real helm at its pinned version.

For dev, staging and prod the program runs under mocks; each registered
`kubernetes:helm.sh/v3:Release` (chart, version, name, namespace, values exactly as registered)
is rendered from its archive in build/charts with `helm template --include-crds`, the stack's
cluster version as --kube-version and the stack's CRD API versions as --api-versions
(tests/support/charts.py). Then:
- every built-in object passes kubernetes-validate strict for that Kubernetes version;
- every custom resource, the charts' own and the program's (LeaderWorkerSet, ScaledObject,
  PodMonitor, PrometheusRule), validates against the OpenAPI schema of the CRD the pinned chart
  installs, with unknown fields rejected (scripts/charts/crd_schema.py);
- the fields that matter are asserted on the rendered output: where the device plugins and
  DCGM run, what Prometheus selects, KEDA, Cluster Autoscaler and LWS being there, and no
  monitor for the control plane EKS hides.
A `weights.cache: pvc` variant checks the LeaderWorkerSet field LWS 0.8.0 added against the pinned
CRD and, with CHART_MIRROR set, against LWS 0.7.0's CRD, which rejects it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from components.monitoring import EKS_MANAGED_COMPONENTS
from components.render.node_group_spec import (
    build_autoscaler_tags,
    build_gpu_labels,
    build_system_labels,
)
from components.render.scrape_config import JOB_DCGM
from scripts.charts.crd_schema import CrdValidator, Issue
from stacks.catalog import INSTANCE_TYPES
from stacks.naming import (
    EFA_LABEL,
    GPU_ROLE,
    GPU_TAINT_EFFECT,
    GPU_TAINT_KEY,
    GPU_TAINT_VALUE,
    INSTANCE_TYPE_LABEL,
    NAMESPACE_NAME_LABEL,
    NODE_ROLE_LABEL,
)
from stacks.settings import load_stack_file
from stacks.versions import (
    CLUSTER_AUTOSCALER,
    DCGM_EXPORTER,
    EFA_DEVICE_PLUGIN,
    HELM_CHARTS,
    KEDA,
    KUBE_PROMETHEUS_STACK,
    LEADER_WORKER_SET,
    NVIDIA_DEVICE_PLUGIN,
    kubernetes_pins,
)
from tests.support.charts import (
    RenderedStack,
    app_version,
    matches_selector,
    mirror,
    pod_labels,
    pod_spec,
    render_stack,
    schedulable_on,
    template_archive,
    tolerates,
)
from tests.support.manifests import manifest
from tests.support.platform_checks import config_key, stack_variant

STACKS = ("dev", "staging", "prod")
GPU_TAINT = {"key": GPU_TAINT_KEY, "value": GPU_TAINT_VALUE, "effect": GPU_TAINT_EFFECT}
PROJECT_CUSTOM_KINDS = {"LeaderWorkerSet", "ScaledObject", "PodMonitor", "PrometheusRule"}
LWS_VERSION_WITHOUT_CLAIMS = "lws-v0.7.0.tgz"


@pytest.fixture(scope="module", params=STACKS)
def stack(request: pytest.FixtureRequest) -> RenderedStack:
    return render_stack(request.param)


def settings(stack: RenderedStack) -> Any:
    return load_stack_file(stack.stack_file)


def nodes(stack: RenderedStack) -> dict[str, dict[str, str]]:
    """Node labels of the stack's node kinds: the system nodes and each GPU group."""
    s = settings(stack)
    found = {"system": {**build_system_labels(), INSTANCE_TYPE_LABEL: s.system_nodes.instance_type}}
    for g in s.gpu_node_groups:
        labels = build_gpu_labels(g.name, efa=g.efa, extra=g.labels)
        found[g.name] = {**labels, INSTANCE_TYPE_LABEL: g.instance_type}
    return found


def daemon_set(stack: RenderedStack, key: str, container: str) -> dict[str, Any]:
    found = [
        d
        for d in stack.release(key).of_kind("DaemonSet")
        if any(c["name"] == container for c in pod_spec(d)["containers"])
    ]
    assert len(found) == 1, f"{key}: no single DaemonSet running {container}"
    return found[0]


# --- what the program installs, rendered from the pins ----------------------------------------


def test_every_release_is_a_pinned_chart_rendered_for_the_stacks_cluster(
    stack: RenderedStack,
) -> None:
    s = settings(stack)
    expected = set(HELM_CHARTS) - (
        set() if s.autoscaling.cluster_autoscaler else {CLUSTER_AUTOSCALER}
    )
    assert set(stack.releases) == expected
    assert stack.kube_version == f"{s.cluster.version}.0"
    assert {
        "leaderworkerset.x-k8s.io/v1",
        "keda.sh/v1alpha1",
        "monitoring.coreos.com/v1",
        "monitoring.coreos.com/v1/PodMonitor",
    } <= set(stack.api_versions)
    for key, rendered in stack.releases.items():
        assert rendered.docs, f"{key} rendered nothing"


def test_every_built_in_object_passes_strict_kubernetes_validate(stack: RenderedStack) -> None:
    problems, checked = [], 0
    for label, doc in stack.chart_objects():
        if stack.is_custom(doc):
            continue
        checked += 1
        try:
            kubernetes_validate.validate(doc, stack.kube_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{label}: neither Kubernetes {stack.kube_version} nor a CRD has it")
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            problems.append(f"{label}: {path}: {err.message}")
    assert checked > 100
    assert problems == []


def test_every_chart_custom_resource_matches_its_crd(stack: RenderedStack) -> None:
    custom = [(label, doc) for label, doc in stack.chart_objects() if stack.is_custom(doc)]
    kinds = {doc["kind"] for _, doc in custom}
    assert {"Prometheus", "Alertmanager", "ServiceMonitor", "PrometheusRule"} <= kinds
    problems = [f"{label}: {i}" for label, doc in custom for i in stack.crds.validate(doc)]
    assert problems == []


def test_every_program_custom_resource_matches_the_crd_the_pinned_chart_installs(
    stack: RenderedStack,
) -> None:
    """No custom resource without a CRD of the stack; every one valid against that CRD."""
    unknown = []
    for resource in stack.run.kubernetes():
        doc = manifest(resource)
        if not stack.is_custom(doc):
            try:
                kubernetes_validate.validate(doc, stack.kube_version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                unknown.append(f"{resource.name}: {doc['apiVersion']} {doc['kind']}")
            except kubernetes_validate.ValidationError:
                pass  # judged by tests/program/test_manifests.py
    assert unknown == [], "custom resources whose CRD no chart of the stack installs"
    custom = stack.program_custom_resources()
    assert {doc["kind"] for _, doc in custom} == PROJECT_CUSTOM_KINDS
    problems = [f"{r.name}: {i}" for r, doc in custom for i in stack.crds.validate(doc)]
    assert problems == []


def test_crd_validation_catches_misspellings_and_bad_enums(stack: RenderedStack) -> None:
    """What the hand-copied LWS field lists used to check, now from the CRD itself."""
    lws = next(
        doc for _, doc in stack.program_custom_resources() if doc["kind"] == "LeaderWorkerSet"
    )
    broken = copy.deepcopy(lws)
    broken["spec"]["startupPolicy"] = "LeaderFirst"
    broken["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"  # a Pod's word, not LWS's
    broken["spec"].setdefault("networkConfig", {})["subdomainpolicy"] = "Shared"
    broken["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["shmSize"] = (
        "8Gi"
    )
    paths = [i.path for i in stack.crds.validate(broken)]
    assert paths == [
        "spec.leaderWorkerTemplate.restartPolicy",
        "spec.leaderWorkerTemplate.workerTemplate.spec.containers[0].shmSize",
        "spec.networkConfig.subdomainpolicy",
        "spec.startupPolicy",
    ]


# --- the rendered fields that matter --------------------------------------------------------


def test_nvidia_device_plugin_runs_on_every_gpu_node_and_nowhere_else(stack: RenderedStack) -> None:
    ds = daemon_set(stack, NVIDIA_DEVICE_PLUGIN, "nvidia-device-plugin-ctr")
    spec = pod_spec(ds)
    assert tolerates(spec.get("tolerations"), GPU_TAINT)
    for name, labels in nodes(stack).items():
        assert schedulable_on(spec, labels) == (labels[NODE_ROLE_LABEL] == GPU_ROLE), name
    for other in stack.release(NVIDIA_DEVICE_PLUGIN).of_kind("DaemonSet"):
        assert not schedulable_on(pod_spec(other), nodes(stack)["system"])


def test_efa_device_plugin_runs_on_efa_gpu_nodes_only(stack: RenderedStack) -> None:
    spec = pod_spec(daemon_set(stack, EFA_DEVICE_PLUGIN, "aws-efa-k8s-device-plugin"))
    assert tolerates(spec.get("tolerations"), GPU_TAINT)
    for name, labels in nodes(stack).items():
        efa_gpu = labels[NODE_ROLE_LABEL] == GPU_ROLE and labels.get(EFA_LABEL) == "true"
        assert schedulable_on(spec, labels) == efa_gpu, name


def test_efa_device_plugin_admits_every_efa_type_of_the_catalog(stack: RenderedStack) -> None:
    """The chart's own instance-type allow-list (supportedInstanceLabels) is in the rendered
    node affinity; every EFA type the catalog lets a group use must pass it."""
    spec = pod_spec(daemon_set(stack, EFA_DEVICE_PLUGIN, "aws-efa-k8s-device-plugin"))
    efa_types = sorted(name for name, t in INSTANCE_TYPES.items() if t.efa_supported)
    assert efa_types
    refused = [
        name
        for name in efa_types
        if not schedulable_on(
            spec,
            {
                **build_gpu_labels("efa", efa=True, extra={}),
                INSTANCE_TYPE_LABEL: name,
            },
        )
    ]
    assert refused == []


def test_efa_device_plugin_writes_each_toleration_once(stack: RenderedStack) -> None:
    spec = pod_spec(daemon_set(stack, EFA_DEVICE_PLUGIN, "aws-efa-k8s-device-plugin"))
    tolerations = [tuple(sorted(t.items())) for t in spec["tolerations"]]
    assert len(tolerations) == len(set(tolerations)), spec["tolerations"]


def test_dcgm_exporter_runs_on_gpu_nodes_and_the_projects_monitor_scrapes_it(
    stack: RenderedStack,
) -> None:
    release = stack.release(DCGM_EXPORTER)
    (ds,) = release.of_kind("DaemonSet")
    spec = pod_spec(ds)
    assert tolerates(spec.get("tolerations"), GPU_TAINT)
    for name, labels in nodes(stack).items():
        assert schedulable_on(spec, labels) == (labels[NODE_ROLE_LABEL] == GPU_ROLE), name
    monitor = next(
        doc
        for _, doc in stack.program_custom_resources()
        if doc["kind"] == "PodMonitor" and doc["metadata"]["name"] == JOB_DCGM
    )["spec"]
    assert release.namespace_of(ds) in monitor["namespaceSelector"]["matchNames"]
    assert matches_selector(monitor["selector"], pod_labels(ds))
    ports = {str(p["containerPort"]) for c in spec["containers"] for p in c.get("ports", [])}
    (endpoint,) = monitor["podMetricsEndpoints"]
    keep = [
        r
        for r in endpoint["relabelings"]
        if r["action"] == "keep"
        and r["sourceLabels"] == ["__meta_kubernetes_pod_container_port_number"]
    ]
    assert keep
    assert {r["regex"] for r in keep} <= ports, (keep, ports)


def _selects(
    selector: dict[str, Any] | None,
    namespace_selector: dict[str, Any] | None,
    own_namespace: str,
    doc: dict[str, Any],
) -> bool:
    """The Prometheus Operator's choice: a nil namespace selector means its own namespace only."""
    namespace = doc["metadata"]["namespace"]
    in_namespace = (
        namespace == own_namespace
        if namespace_selector is None
        else matches_selector(namespace_selector, {NAMESPACE_NAME_LABEL: namespace})
    )
    return in_namespace and matches_selector(selector, doc["metadata"].get("labels") or {})


def test_prometheus_selects_the_projects_monitors_and_rules(stack: RenderedStack) -> None:
    release = stack.release(KUBE_PROMETHEUS_STACK)
    (prometheus,) = release.of_kind("Prometheus")
    spec, own = prometheus["spec"], release.namespace_of(prometheus)
    selectors = {
        "PodMonitor": ("podMonitorSelector", "podMonitorNamespaceSelector"),
        "ServiceMonitor": ("serviceMonitorSelector", "serviceMonitorNamespaceSelector"),
        "PrometheusRule": ("ruleSelector", "ruleNamespaceSelector"),
    }
    chosen = [
        (r.name, doc) for r, doc in stack.program_custom_resources() if doc["kind"] in selectors
    ]
    assert {doc["kind"] for _, doc in chosen} >= {"PodMonitor", "PrometheusRule"}
    missed = [
        name
        for name, doc in chosen
        if not _selects(
            spec.get(selectors[doc["kind"]][0]), spec.get(selectors[doc["kind"]][1]), own, doc
        )
    ]
    assert missed == []


def test_the_control_plane_eks_hides_is_neither_scraped_nor_alerted_on(
    stack: RenderedStack,
) -> None:
    release = stack.release(KUBE_PROMETHEUS_STACK)
    hidden = ("kube-controller-manager", "kube-scheduler", "kube-etcd")
    monitors = [d["metadata"]["name"] for d in release.of_kind("ServiceMonitor")]
    services = [d["metadata"]["name"] for d in release.of_kind("Service")]
    assert [n for n in monitors + services if n.endswith(hidden)] == []
    groups = {g["name"]: g for d in release.of_kind("PrometheusRule") for g in d["spec"]["groups"]}
    assert {
        "etcd",
        "kubernetes-system-controller-manager",
        "kubernetes-system-scheduler",
        "kube-scheduler.rules",
    }.isdisjoint(groups)
    alerts = {r["alert"] for g in groups.values() for r in g["rules"] if "alert" in r}
    assert {"KubeControllerManagerDown", "KubeSchedulerDown"}.isdisjoint(alerts)
    assert not [a for a in alerts if a.startswith("etcd")]
    assert {"KubeAPIDown", "KubeletDown"} <= alerts  # what EKS does expose is still watched
    assert set(EKS_MANAGED_COMPONENTS) == {"kubeControllerManager", "kubeScheduler", "kubeEtcd"}


def test_keda_operator_and_metrics_server_are_installed(stack: RenderedStack) -> None:
    release = stack.release(KEDA)
    names = {d["metadata"]["name"] for d in release.of_kind("Deployment")}
    assert {"keda-operator", "keda-operator-metrics-apiserver"} <= names
    api = release.named("APIService", "v1beta1.external.metrics.k8s.io")["spec"]
    services = {d["metadata"]["name"] for d in release.of_kind("Service")}
    assert api["service"]["name"] in services
    assert api["service"]["namespace"] == release.release.namespace


def test_cluster_autoscaler_discovers_this_clusters_node_groups(stack: RenderedStack) -> None:
    s = settings(stack)
    if not s.autoscaling.cluster_autoscaler:
        pytest.skip(f"{stack.run.stack} runs no Cluster Autoscaler")
    release = stack.release(CLUSTER_AUTOSCALER)
    (deployment,) = release.of_kind("Deployment")
    (container,) = pod_spec(deployment)["containers"]
    args = container.get("command", []) + container.get("args", [])
    discovery = [a for a in args if a.startswith("--node-group-auto-discovery=asg:tag=")]
    assert len(discovery) == 1, args
    tags = discovery[0].removeprefix("--node-group-auto-discovery=asg:tag=").split(",")
    cluster = s.cluster.name
    assert f"k8s.io/cluster-autoscaler/{cluster}" in tags
    assert "--cloud-provider=aws" in args
    for g in s.gpu_node_groups:
        group_tags = build_autoscaler_tags(
            cluster, g.labels, INSTANCE_TYPES[g.instance_type], efa=g.efa
        )
        assert set(tags) <= set(group_tags), g.name
    pins = kubernetes_pins(s.cluster.version)
    assert pins is not None
    assert container["image"].endswith(f":{pins.cluster_autoscaler_image_tag}")


def test_lws_controller_is_deployed(stack: RenderedStack) -> None:
    release = stack.release(LEADER_WORKER_SET)
    deployment = release.named("Deployment", "lws-controller-manager")
    assert release.namespace_of(deployment) == release.release.namespace
    images = [c["image"] for c in pod_spec(deployment)["containers"]]
    assert any(i.endswith(f"/lws:{app_version(LEADER_WORKER_SET)}") for i in images), images


# --- LWS 0.7.0 lacked volumeClaimTemplates ----------------------------------------------------


def _pvc_cache(config: dict[str, Any]) -> None:
    for deployment in config[config_key("serving")]["deployments"]:
        deployment["weights"] = {"cache": "pvc"}


@pytest.fixture(scope="module")
def pvc_stack(tmp_path_factory: pytest.TempPathFactory) -> RenderedStack:
    path: Path = stack_variant(tmp_path_factory.mktemp("pvc"), "dev", "dev", _pvc_cache)
    return render_stack("dev", path)


def _claiming_lws(stack: RenderedStack) -> list[dict[str, Any]]:
    found = [
        doc
        for _, doc in stack.program_custom_resources()
        if doc["kind"] == "LeaderWorkerSet"
        and doc["spec"]["leaderWorkerTemplate"].get("volumeClaimTemplates")
    ]
    assert found, "weights.cache: pvc rendered no LeaderWorkerSet with volumeClaimTemplates"
    return found


def test_pvc_weights_cache_validates_against_the_pinned_lws_crd(pvc_stack: RenderedStack) -> None:
    problems = [str(i) for doc in _claiming_lws(pvc_stack) for i in pvc_stack.crds.validate(doc)]
    assert problems == []


def test_pvc_weights_cache_is_refused_by_lws_0_7_0(pvc_stack: RenderedStack) -> None:
    """The reason for the v0.10.0 pin: LWS 0.7.0's CRD has no volumeClaimTemplates."""
    chart_mirror = mirror()
    if chart_mirror is None:
        pytest.skip("CHART_MIRROR is not set: LWS 0.7.0's chart comes only from the mirror")
    archive = chart_mirror / LWS_VERSION_WITHOUT_CLAIMS
    assert archive.is_file(), f"{archive} is missing from the chart mirror"
    old = CrdValidator.from_docs(
        template_archive(archive, "lws", "lws-system", pvc_stack.kube_version),
        check_schemas=False,
    )
    for doc in _claiming_lws(pvc_stack):
        issues = old.validate(doc)
        assert Issue("spec.leaderWorkerTemplate.volumeClaimTemplates", "unknown field") in issues
