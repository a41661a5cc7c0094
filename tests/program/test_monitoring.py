"""Monitoring under Pulumi mocks, per stack: the kube-prometheus-stack release and its values,
the monitors (right pods, right ports, right labels), the PrometheusRule, the dashboards'
ConfigMaps, the Grafana admin Secret, and what `protect` keeps in prod."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest

from components.render.alert_rules import build_alert_rules
from components.render.dashboards import build_dashboards
from stacks.naming import LWS_NAME_LABEL, LWS_WORKER_INDEX_LABEL, NAME_LABEL
from stacks.settings import ROOT, load_stack_file
from tests.support.harness import MOCK_SECRET, Resource, StackRun, mock_password, run_stack

STACKS = ["dev", "staging", "prod"]
RELEASE = "kubernetes:helm.sh/v3:Release"
POD_MONITOR = "kubernetes:monitoring.coreos.com/v1:PodMonitor"
RULE = "kubernetes:monitoring.coreos.com/v1:PrometheusRule"
SYSTEM = {"qwen-vl-serving/role": "system"}
# Hand-written from the stack files: (retention, Prometheus volume, its retention size).
STORAGE = {
    "dev": ("3d", "20Gi", "17GB"),
    "staging": ("7d", "50Gi", "42GB"),
    "prod": ("30d", "200Gi", "170GB"),
}
DEPLOYMENTS = {
    "dev": {"qwen3-vl-2b": "Qwen/Qwen3-VL-2B-Instruct"},
    "staging": {
        "qwen3-vl-2b": "Qwen/Qwen3-VL-2B-Instruct",
        "qwen3-vl-32b": "Qwen/Qwen3-VL-32B-Instruct",
    },
    "prod": {
        "qwen3-vl-2b": "Qwen/Qwen3-VL-2B-Instruct",
        "qwen3-vl-235b": "Qwen/Qwen3-VL-235B-A22B-Instruct",
    },
}


@pytest.fixture(scope="module", params=STACKS)
def run(request: pytest.FixtureRequest) -> StackRun:
    return run_stack(request.param)


def unwrap(value: Any) -> Any:
    """Secret inputs arrive wrapped ({<sig>: ..., "value": ...}); plain ones as they are."""
    if isinstance(value, Mapping) and "value" in value and len(value) == 2:
        return value["value"]
    return value


def release(run: StackRun) -> Resource:
    return run.one(RELEASE, "monitoring-kube-prometheus-stack")


def monitors(run: StackRun) -> dict[str, dict[str, Any]]:
    return {r.inputs["metadata"]["name"]: r.inputs for r in run.of_type(POD_MONITOR)}


def relabel_value(endpoint: Mapping[str, Any], target: str) -> Any:
    rules = [r for r in endpoint["relabelings"] if r.get("targetLabel") == target]
    assert len(rules) == 1, (target, endpoint["relabelings"])
    return rules[0].get("replacement", rules[0].get("sourceLabels"))


def kept_port(endpoint: Mapping[str, Any]) -> int:
    (keep,) = [r for r in endpoint["relabelings"] if r["action"] == "keep"]
    assert keep["sourceLabels"] == ["__meta_kubernetes_pod_container_port_number"]
    return int(keep["regex"])


def test_release_is_pinned_and_runs_on_the_system_nodes(run: StackRun) -> None:
    r = release(run).inputs
    assert (r["chart"], r["version"], r["name"], r["namespace"]) == (
        "kube-prometheus-stack",
        "88.5.3",  # a released version (81.4.5, pinned before, never was)
        "kube-prometheus-stack",
        "monitoring",
    )
    assert r["repositoryOpts"]["repo"] == "https://prometheus-community.github.io/helm-charts"
    v = r["values"]
    for where in (v["prometheus"]["prometheusSpec"], v["alertmanager"]["alertmanagerSpec"],
                  v["prometheusOperator"], v["grafana"], v["kube-state-metrics"]):  # fmt: skip
        assert where["nodeSelector"] == SYSTEM
    # node exporter must reach the tainted GPU nodes too (clock offset)
    assert v["prometheus-node-exporter"]["tolerations"] == [{"operator": "Exists"}]


def test_retention_and_volume_come_from_settings(run: StackRun) -> None:
    retention, size, retention_size = STORAGE[run.stack]
    spec = release(run).inputs["values"]["prometheus"]["prometheusSpec"]
    assert spec["retention"] == retention
    assert spec["retentionSize"] == retention_size
    claim = spec["storageSpec"]["volumeClaimTemplate"]["spec"]
    assert claim["resources"]["requests"]["storage"] == size
    assert claim["storageClassName"] == "monitoring-gp3"
    assert spec["scrapeInterval"] == "15s"
    for key in ("podMonitorSelectorNilUsesHelmValues", "serviceMonitorSelectorNilUsesHelmValues",
                "ruleSelectorNilUsesHelmValues"):  # fmt: skip
        assert spec[key] is False


def test_kube_state_metrics_exports_the_labels_the_alerts_join_on(run: StackRun) -> None:
    ksm = release(run).inputs["values"]["kube-state-metrics"]
    assert ksm["metricLabelsAllowlist"] == [
        "nodes=[qwen-vl-serving/node-group]",
        "pods=[leaderworkerset.sigs.k8s.io/name]",
    ]


def test_grafana_password_comes_from_a_secret_not_the_values(run: StackRun) -> None:
    grafana = release(run).inputs["values"]["grafana"]
    assert grafana["admin"] == {
        "existingSecret": "grafana-admin",
        "userKey": "admin-user",
        "passwordKey": "admin-password",
    }
    secret = run.one("kubernetes:core/v1:Secret", "monitoring-grafana-admin").inputs
    assert secret["metadata"]["name"] == "grafana-admin"
    assert secret["metadata"]["namespace"] == "monitoring"
    assert unwrap(secret["stringData"])["admin-password"] == mock_password("grafana-admin-password")
    values_text = json.dumps(release(run).inputs["values"])
    assert mock_password("grafana-admin-password") not in values_text
    assert MOCK_SECRET not in values_text
    assert grafana["sidecar"]["dashboards"]["label"] == "grafana_dashboard"


def test_protection_keeps_the_data_in_prod_only(run: StackRun) -> None:
    prod = run.stack == "prod"
    storage = run.one("kubernetes:storage.k8s.io/v1:StorageClass", "monitoring-storage-class")
    assert storage.inputs["reclaimPolicy"] == ("Retain" if prod else "Delete")
    assert storage.inputs["provisioner"] == "ebs.csi.aws.com"
    assert storage.inputs["parameters"]["type"] == "gp3"
    assert release(run).protect is prod
    assert storage.protect is prod
    assert run.one("kubernetes:core/v1:Namespace", "monitoring-namespace").protect is prod
    values = release(run).inputs["values"]
    spec = values["prometheus"]["prometheusSpec"]
    grafana_pvc = values["grafana"]["persistence"]
    if prod:
        assert spec["persistentVolumeClaimRetentionPolicy"] == {
            "whenDeleted": "Retain",
            "whenScaled": "Retain",
        }
        assert grafana_pvc["annotations"] == {"helm.sh/resource-policy": "keep"}
    else:
        assert "persistentVolumeClaimRetentionPolicy" not in spec
        assert grafana_pvc["annotations"] == {}


def test_one_leader_monitor_per_deployment(run: StackRun) -> None:
    found = monitors(run)
    expected = DEPLOYMENTS[run.stack]
    assert {n for n in found if n.startswith("vllm-")} == {f"vllm-{d}" for d in expected}
    for name, model in expected.items():
        spec = found[f"vllm-{name}"]["spec"]
        assert spec["namespaceSelector"] == {"matchNames": ["qwen-vl"]}
        # leaders only: in a multi-node group only worker 0 serves /metrics
        assert spec["selector"] == {
            "matchLabels": {LWS_NAME_LABEL: name, LWS_WORKER_INDEX_LABEL: "0"}
        }
        (endpoint,) = spec["podMetricsEndpoints"]
        assert (endpoint["path"], kept_port(endpoint)) == ("/metrics", 8000)
        assert relabel_value(endpoint, "job") == "vllm"
        assert relabel_value(endpoint, "deployment") == name
        assert relabel_value(endpoint, "model") == model
        assert relabel_value(endpoint, "group") == [
            "__meta_kubernetes_pod_label_leaderworkerset_sigs_k8s_io_group_index"
        ]


def test_leader_monitors_match_the_leaderworkersets(run: StackRun) -> None:
    """The LWS each monitor selects exists, in the namespace it watches, and its leader declares
    the port the monitor keeps."""
    lws = {
        r.inputs["metadata"]["name"]: r.inputs
        for r in run.of_type("kubernetes:leaderworkerset.x-k8s.io/v1:LeaderWorkerSet")
    }
    for name, m in monitors(run).items():
        if not name.startswith("vllm-"):
            continue
        target = lws[m["spec"]["selector"]["matchLabels"][LWS_NAME_LABEL]]
        assert target["metadata"]["namespace"] in m["spec"]["namespaceSelector"]["matchNames"]
        templates = target["spec"]["leaderWorkerTemplate"]
        # LWS runs the leader from workerTemplate when there is no leaderTemplate (size 1)
        leader = templates.get("leaderTemplate", templates["workerTemplate"])["spec"]
        ports = {p["containerPort"] for c in leader["containers"] for p in c.get("ports", [])}
        assert kept_port(m["spec"]["podMetricsEndpoints"][0]) in ports


EXPORTERS = {  # monitor: (namespace, app.kubernetes.io/name, port, adds a node label)
    "dcgm-exporter": ("kube-system", "dcgm-exporter", 9400, True),
    "node-exporter": ("monitoring", "prometheus-node-exporter", 9100, True),
    "nginx-exporter": ("qwen-vl", "gateway", 9113, False),
    "redis-exporter": ("qwen-vl", "redis", 9121, False),
}


def test_exporter_monitors_select_the_right_pods_and_ports(run: StackRun) -> None:
    found = monitors(run)
    for name, (namespace, app, port, node) in EXPORTERS.items():
        spec = found[name]["spec"]
        assert spec["namespaceSelector"] == {"matchNames": [namespace]}
        assert spec["selector"] == {"matchLabels": {NAME_LABEL: app}}
        (endpoint,) = spec["podMetricsEndpoints"]
        assert kept_port(endpoint) == port
        assert relabel_value(endpoint, "job") == name
        has_node = any(r.get("targetLabel") == "node" for r in endpoint["relabelings"])
        assert has_node is node
    assert (
        release(run).inputs["values"]["prometheus-node-exporter"]["nameOverride"]
        == "prometheus-node-exporter"
    )


def pod_templates(run: StackRun) -> list[dict[str, Any]]:
    workloads = run.of_type("kubernetes:apps/v1:Deployment") + run.of_type(
        "kubernetes:apps/v1:StatefulSet"
    )
    # Specs holding a secret (Redis' password) arrive wrapped.
    return [unwrap(w.inputs["spec"])["template"] for w in workloads]


@pytest.mark.parametrize("monitor", ["nginx-exporter", "redis-exporter"])
def test_exporter_monitors_match_the_gateway_and_redis_pods(run: StackRun, monitor: str) -> None:
    """The gateway and data stages' pods carry the selected label and declare the exporter port."""
    spec = monitors(run)[monitor]["spec"]
    wanted = spec["selector"]["matchLabels"]
    port = kept_port(spec["podMetricsEndpoints"][0])
    (template,) = [
        t for t in pod_templates(run) if wanted.items() <= t["metadata"]["labels"].items()
    ]
    ports = {p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    assert port in ports


def test_prometheus_rule_carries_the_generated_alerts(run: StackRun) -> None:
    (rule,) = run.of_type(RULE)
    assert rule.inputs["metadata"]["namespace"] == "monitoring"
    settings = load_stack_file(ROOT / f"Pulumi.{run.stack}.yaml")
    assert rule.inputs["spec"] == build_alert_rules(settings)


def test_dashboards_ship_as_sidecar_configmaps(run: StackRun) -> None:
    settings = load_stack_file(ROOT / f"Pulumi.{run.stack}.yaml")
    maps = [
        r
        for r in run.of_type("kubernetes:core/v1:ConfigMap")
        if r.name.startswith("monitoring-dashboard-")
    ]
    shipped = {}
    for cm in maps:
        assert cm.inputs["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm.inputs["metadata"]["namespace"] == "monitoring"
        shipped |= {name: json.loads(text) for name, text in cm.inputs["data"].items()}
    assert shipped == build_dashboards(settings)


def test_monitoring_objects_use_the_cluster_provider_and_wait_for_the_crds(run: StackRun) -> None:
    (provider,) = run.of_type("pulumi:providers:kubernetes")
    mine = [r for r in run.resources if r.name.startswith("monitoring-") and r.custom]
    assert len(mine) >= 10
    for r in mine:
        assert r.provider.startswith(provider.urn), r.name
    release_urn = release(run).urn
    for r in run.of_type(POD_MONITOR) + run.of_type(RULE):
        assert release_urn in r.dependencies, r.name


def test_outputs_name_the_internal_urls(run: StackRun) -> None:
    assert (
        run.outputs["prometheus_internal_url"]
        == "http://monitoring-prometheus.monitoring.svc.cluster.local:9090"
    )
    assert run.outputs["grafana_internal_url"] == "http://grafana.monitoring.svc.cluster.local:3000"
