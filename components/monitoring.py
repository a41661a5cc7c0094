"""Monitoring: kube-prometheus-stack, the monitors that scrape the stack, its alerts and dashboards.

Provisions, in the monitoring namespace: a gp3 StorageClass for Prometheus and Grafana
(reclaim policy Retain when the stack is protected), the Grafana admin Secret (from a
Pulumi secret), the kube-prometheus-stack Helm release (pinned in stacks/versions.py,
on the system node group), one PodMonitor per vLLM deployment (leader pods only: in a
multi-node group only the leader serves /metrics) and one each for the DCGM, nginx, Redis
and node exporters, a PrometheusRule with components/render/alert_rules.py's rules, and one
ConfigMap per dashboard of components/render/dashboards.py for Grafana's dashboard sidecar.

Every monitor sets `job` and the labels of components/render/scrape_config.py through
relabelling, so the rules and dashboards work the same here and in the offline rehearsal.
Targets are picked by container port number (a `keep` relabelling on the declared port),
so the monitors do not depend on the port names other components chose.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import pulumi
import pulumi_kubernetes as k8s

from components.redis import gp3_storage_class
from components.render.scrape_config import (
    DEPLOYMENT,
    GROUP,
    JOB_DCGM,
    JOB_NGINX,
    JOB_NODE,
    JOB_REDIS,
    JOB_ROUTER,
    JOB_VLLM,
    METRICS_PATH,
    MODEL,
    NODE,
    label_name,
)
from stacks.naming import (
    DCGM_EXPORTER_NAME,
    DCGM_EXPORTER_NAMESPACE,
    DCGM_EXPORTER_PORT,
    GATEWAY_METRICS_PORT,
    GATEWAY_NAME,
    GRAFANA_PORT,
    LWS_GROUP_INDEX_LABEL,
    LWS_NAME_LABEL,
    LWS_WORKER_INDEX_LABEL,
    MONITORING_FULLNAME,
    MONITORING_NAMESPACE,
    NAME_LABEL,
    NGINX_EXPORTER_PORT,
    NODE_EXPORTER_PORT,
    NODE_GROUP_LABEL,
    PROMETHEUS_PORT,
    PROMETHEUS_SERVICE,
    REDIS_EXPORTER_PORT,
    REDIS_NAME,
    TYPE_PREFIX,
    VLLM_METRICS_PATH,
    VLLM_PORT,
    common_labels,
    lws_name,
    service_host,
    system_node_selector,
)
from stacks.versions import KUBE_PROMETHEUS_STACK, helm_chart

TYPE: Final = f"{TYPE_PREFIX}:observability:Monitoring"
MONITORING_API: Final = "monitoring.coreos.com/v1"
RELEASE_NAME: Final = "kube-prometheus-stack"
GRAFANA_SERVICE: Final = "grafana"
GRAFANA_ADMIN_SECRET: Final = "grafana-admin"
GRAFANA_ADMIN_USER: Final = "admin"
GRAFANA_USER_KEY: Final = "admin-user"
GRAFANA_PASSWORD_KEY: Final = "admin-password"
# Grafana's dashboard sidecar loads every ConfigMap with this label (kube-prometheus-stack's
# own dashboards use the same one).
DASHBOARD_LABEL: Final = "grafana_dashboard"
DASHBOARD_LABEL_VALUE: Final = "1"
STORAGE_CLASS: Final = "monitoring-gp3"
# Helm keeps an object carrying this annotation on uninstall (Grafana's PVC is Helm's own).
HELM_KEEP: Final = {"helm.sh/resource-policy": "keep"}
# Prometheus deletes the oldest blocks above this share of its volume, before the disk fills.
RETENTION_SIZE_SHARE: Final = 0.85
# prometheus-node-exporter's pod label (its chart name); set explicitly so it cannot drift.
NODE_EXPORTER_NAME: Final = "prometheus-node-exporter"
SYSTEM_NODES: Final[Mapping[str, str]] = system_node_selector()
# kube-prometheus-stack's values keys of control-plane components EKS manages (and hides).
EKS_MANAGED_COMPONENTS: Final = ("kubeControllerManager", "kubeScheduler", "kubeEtcd")


def prometheus_url() -> str:
    return f"http://{service_host(PROMETHEUS_SERVICE, MONITORING_NAMESPACE)}:{PROMETHEUS_PORT}"


def grafana_url() -> str:
    return f"http://{service_host(GRAFANA_SERVICE, MONITORING_NAMESPACE)}:{GRAFANA_PORT}"


def meta_pod_label(key: str) -> str:
    """Prometheus' Kubernetes SD name for a pod label (invalid characters become `_`)."""
    return "__meta_kubernetes_pod_label_" + label_name(key)


@dataclass(frozen=True, kw_only=True)
class LeaderTarget:
    """One vLLM deployment whose leader pods are scraped."""

    deployment: str
    model: str


@dataclass(frozen=True, kw_only=True)
class StackValuesInput:
    retention_days: int
    volume_gib: int
    grafana_volume_gib: int
    scrape_interval_seconds: int
    protect: bool


def build_stack_values(v: StackValuesInput) -> dict[str, Any]:
    """kube-prometheus-stack values: everything on the system nodes, data on gp3 volumes."""
    interval = f"{v.scrape_interval_seconds}s"
    system = dict(SYSTEM_NODES)
    return {
        "fullnameOverride": MONITORING_FULLNAME,
        "crds": {"enabled": True},
        "prometheusOperator": {
            "nodeSelector": system,
            "admissionWebhooks": {"patch": {"nodeSelector": system}},
        },
        "prometheus": {"prometheusSpec": _prometheus_spec(v, interval)},
        "alertmanager": {"alertmanagerSpec": {"nodeSelector": system}},
        "grafana": _grafana_values(v),
        "kube-state-metrics": {
            "nodeSelector": system,
            # Node and pod labels are exported only when allow-listed: the GPU alerts join on
            # the node group, the restart alert on the LeaderWorkerSet name.
            "metricLabelsAllowlist": [f"nodes=[{NODE_GROUP_LABEL}]", f"pods=[{LWS_NAME_LABEL}]"],
        },
        # EKS runs the control plane: kube-controller-manager, kube-scheduler and etcd are not
        # reachable from the cluster, so the chart's default monitors for them would find no
        # target and their *Down alerts would fire forever. Off, with their Services, rules and
        # dashboards (tests/artifacts/test_helm_releases.py checks the rendered chart).
        **{component: {"enabled": False} for component in EKS_MANAGED_COMPONENTS},
        "prometheus-node-exporter": {
            "nameOverride": NODE_EXPORTER_NAME,
            # Clock offset matters most on the tainted GPU nodes: run on every node.
            "tolerations": [{"operator": "Exists"}],
            # Scraped by this component's own PodMonitor (job and node labels as offline).
            "prometheus": {"monitor": {"enabled": False}},
        },
    }


def _prometheus_spec(v: StackValuesInput, interval: str) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "nodeSelector": dict(SYSTEM_NODES),
        "scrapeInterval": interval,
        "evaluationInterval": interval,
        "retention": f"{v.retention_days}d",
        # Prometheus' size units are powers of two ("GB" = GiB).
        "retentionSize": f"{int(v.volume_gib * RETENTION_SIZE_SHARE)}GB",
        # Select every PodMonitor/ServiceMonitor/PrometheusRule, not only the chart's own.
        "podMonitorSelectorNilUsesHelmValues": False,
        "serviceMonitorSelectorNilUsesHelmValues": False,
        "ruleSelectorNilUsesHelmValues": False,
        "storageSpec": {
            "volumeClaimTemplate": {
                "spec": {
                    "storageClassName": STORAGE_CLASS,
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": f"{v.volume_gib}Gi"}},
                }
            }
        },
    }
    if v.protect:
        # The StatefulSet keeps its PVC when deleted or scaled down; the StorageClass keeps the
        # EBS volume even if the PVC is deleted by hand.
        spec["persistentVolumeClaimRetentionPolicy"] = {
            "whenDeleted": "Retain",
            "whenScaled": "Retain",
        }
    return spec


def _grafana_values(v: StackValuesInput) -> dict[str, Any]:
    return {
        "fullnameOverride": GRAFANA_SERVICE,
        "nodeSelector": dict(SYSTEM_NODES),
        "admin": {
            "existingSecret": GRAFANA_ADMIN_SECRET,
            "userKey": GRAFANA_USER_KEY,
            "passwordKey": GRAFANA_PASSWORD_KEY,
        },
        "service": {"port": GRAFANA_PORT},
        "persistence": {
            "enabled": True,
            "type": "pvc",
            "storageClassName": STORAGE_CLASS,
            "accessModes": ["ReadWriteOnce"],
            "size": f"{v.grafana_volume_gib}Gi",
            "annotations": dict(HELM_KEEP) if v.protect else {},
        },
        # A ReadWriteOnce volume cannot be attached to the new pod while the old one holds it.
        "deploymentStrategy": {"type": "Recreate"},
        "sidecar": {
            "dashboards": {
                "enabled": True,
                "label": DASHBOARD_LABEL,
                "labelValue": DASHBOARD_LABEL_VALUE,
                "searchNamespace": MONITORING_NAMESPACE,
            }
        },
    }


def _relabel(target: str, replacement: str) -> dict[str, Any]:
    return {"action": "replace", "targetLabel": target, "replacement": replacement}


def _endpoint(
    job: str, port: int, path: str, interval: str, extra: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    return {
        "path": path,
        "interval": interval,
        "relabelings": [
            # Keep the target on the exporter's declared container port only.
            {
                "action": "keep",
                "sourceLabels": ["__meta_kubernetes_pod_container_port_number"],
                "regex": str(port),
            },
            _relabel("job", job),
            *extra,
        ],
    }


def _node_label() -> dict[str, Any]:
    return {
        "action": "replace",
        "sourceLabels": ["__meta_kubernetes_pod_node_name"],
        "targetLabel": NODE,
    }


def build_leader_monitor(t: LeaderTarget, namespace: str, interval: str) -> dict[str, Any]:
    """PodMonitor spec for one deployment's leaders (worker index 0 of every group)."""
    labels = [
        _relabel(DEPLOYMENT, t.deployment),
        _relabel(MODEL, t.model),
        {
            "action": "replace",
            "sourceLabels": [meta_pod_label(LWS_GROUP_INDEX_LABEL)],
            "targetLabel": GROUP,
        },
    ]
    return {
        "namespaceSelector": {"matchNames": [namespace]},
        "selector": {
            "matchLabels": {LWS_NAME_LABEL: lws_name(t.deployment), LWS_WORKER_INDEX_LABEL: "0"}
        },
        "podMetricsEndpoints": [
            _endpoint(JOB_VLLM, VLLM_PORT, VLLM_METRICS_PATH, interval, labels)
        ],
    }


def build_exporter_monitors(
    *, serving_namespace: str, redis: bool, interval: str
) -> dict[str, dict[str, Any]]:
    """PodMonitor specs for the exporters, by monitor name."""

    def monitor(
        namespace: str, name: str, job: str, port: int, extra: Sequence[dict[str, Any]] = ()
    ) -> dict[str, Any]:
        return {
            "namespaceSelector": {"matchNames": [namespace]},
            "selector": {"matchLabels": {NAME_LABEL: name}},
            "podMetricsEndpoints": [_endpoint(job, port, METRICS_PATH, interval, extra)],
        }

    monitors = {
        JOB_DCGM: monitor(
            DCGM_EXPORTER_NAMESPACE,
            DCGM_EXPORTER_NAME,
            JOB_DCGM,
            DCGM_EXPORTER_PORT,
            [_node_label()],
        ),
        JOB_NODE: monitor(
            MONITORING_NAMESPACE, NODE_EXPORTER_NAME, JOB_NODE, NODE_EXPORTER_PORT, [_node_label()]
        ),
        JOB_NGINX: monitor(serving_namespace, GATEWAY_NAME, JOB_NGINX, NGINX_EXPORTER_PORT),
        JOB_ROUTER: monitor(serving_namespace, GATEWAY_NAME, JOB_ROUTER, GATEWAY_METRICS_PORT),
    }
    if redis:
        monitors[JOB_REDIS] = monitor(serving_namespace, REDIS_NAME, JOB_REDIS, REDIS_EXPORTER_PORT)
    return monitors


@dataclass(frozen=True, kw_only=True)
class MonitoringArgs:
    values: StackValuesInput
    serving_namespace: str
    leaders: Sequence[LeaderTarget]
    redis: bool
    alert_rules: Mapping[str, Any]  # components/render/alert_rules.py: build_alert_rules()
    dashboards: Mapping[
        str, Mapping[str, Any]
    ]  # components/render/dashboards.py: build_dashboards()
    grafana_admin_password: pulumi.Input[str]
    # What must exist first (the system node group), so destroy removes monitoring first.
    depends_on: Sequence[pulumi.Resource] = ()


class Monitoring(pulumi.ComponentResource):
    release: k8s.helm.v3.Release
    prometheus_url: pulumi.Output[str]
    grafana_url: pulumi.Output[str]

    def __init__(
        self, name: str, args: MonitoringArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(TYPE, name, None, opts)
        self._name = name
        protect = args.values.protect
        labels = common_labels("monitoring", name)
        namespace = k8s.core.v1.Namespace(
            f"{name}-namespace",
            metadata={"name": MONITORING_NAMESPACE, "labels": labels},
            opts=self._child(depends_on=list(args.depends_on), protect=protect),
        )
        storage = gp3_storage_class(
            f"{name}-storage-class",
            STORAGE_CLASS,
            labels,
            protect=protect,
            opts=self._child(protect=protect),
        )
        secret = k8s.core.v1.Secret(
            f"{name}-grafana-admin",
            metadata={
                "name": GRAFANA_ADMIN_SECRET,
                "namespace": namespace.metadata.name,
                "labels": labels,
            },
            string_data={
                GRAFANA_USER_KEY: GRAFANA_ADMIN_USER,
                GRAFANA_PASSWORD_KEY: args.grafana_admin_password,
            },
            opts=self._child(),
        )
        self.release = self._release(name, args, namespace, [storage, secret])
        interval = f"{args.values.scrape_interval_seconds}s"
        monitors = {
            f"vllm-{t.deployment}": build_leader_monitor(t, args.serving_namespace, interval)
            for t in args.leaders
        }
        monitors |= build_exporter_monitors(
            serving_namespace=args.serving_namespace, redis=args.redis, interval=interval
        )
        for monitor_name, spec in monitors.items():
            self._custom("PodMonitor", monitor_name, spec, labels)
        self._custom("PrometheusRule", "alerts", args.alert_rules, labels)
        for file_name, model in args.dashboards.items():
            self._dashboard(file_name, model, labels)
        self.prometheus_url = pulumi.Output.from_input(prometheus_url())
        self.grafana_url = pulumi.Output.from_input(grafana_url())
        self.register_outputs(
            {
                "prometheus_url": self.prometheus_url,
                "grafana_url": self.grafana_url,
                "release": self.release.status,
            }
        )

    def _child(self, **kwargs: Any) -> pulumi.ResourceOptions:
        return pulumi.ResourceOptions(parent=self, **kwargs)

    def _release(
        self,
        name: str,
        args: MonitoringArgs,
        namespace: k8s.core.v1.Namespace,
        needs: list[pulumi.Resource],
    ) -> k8s.helm.v3.Release:
        chart = helm_chart(KUBE_PROMETHEUS_STACK)
        return k8s.helm.v3.Release(
            f"{name}-{KUBE_PROMETHEUS_STACK}",
            k8s.helm.v3.ReleaseArgs(
                name=RELEASE_NAME,
                chart=chart.reference,
                version=chart.version,
                repository_opts=k8s.helm.v3.RepositoryOptsArgs(repo=chart.repository),
                namespace=namespace.metadata.name,
                values=build_stack_values(args.values),
                # The CRDs and the admission webhook must be up before the monitors are created.
                atomic=True,
                timeout=900,
            ),
            opts=self._child(depends_on=needs, protect=args.values.protect),
        )

    def _custom(
        self, kind: str, object_name: str, spec: Mapping[str, Any], labels: Mapping[str, str]
    ) -> k8s.apiextensions.CustomResource:
        """A Prometheus Operator object; created after the release that brings its CRD."""
        return k8s.apiextensions.CustomResource(
            f"{self._name}-{kind.lower()}-{object_name}",
            api_version=MONITORING_API,
            kind=kind,
            metadata={
                "name": object_name,
                "namespace": MONITORING_NAMESPACE,
                "labels": dict(labels),
            },
            spec=dict(spec),
            opts=self._child(depends_on=[self.release]),
        )

    def _dashboard(
        self, file_name: str, model: Mapping[str, Any], labels: Mapping[str, str]
    ) -> None:
        object_name = file_name.removesuffix(".json")
        k8s.core.v1.ConfigMap(
            f"{self._name}-dashboard-{object_name}",
            metadata={
                "name": f"dashboard-{object_name}",
                "namespace": MONITORING_NAMESPACE,
                "labels": {**labels, DASHBOARD_LABEL: DASHBOARD_LABEL_VALUE},
            },
            data={file_name: json.dumps(model, indent=2, sort_keys=True)},
            opts=self._child(depends_on=[self.release]),
        )
