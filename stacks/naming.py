"""Names, labels, ports and resource keys shared by components, renderers and the rehearsal.

Anything one component finds another by (a Service name, a label selector, a
port) is defined here once, so the gateway's upstreams, the engines' Services,
the monitors' selectors and the offline rehearsal cannot drift apart.
"""

from __future__ import annotations

import re
from typing import Final

TYPE_PREFIX: Final = "qwen-vl-serving"
PART_OF: Final = "qwen-vl-serving"

# Kubernetes labels.
NAME_LABEL: Final = "app.kubernetes.io/name"
COMPONENT_LABEL: Final = "app.kubernetes.io/component"
PART_OF_LABEL: Final = "app.kubernetes.io/part-of"
DEPLOYMENT_LABEL: Final = "qwen-vl-serving/deployment"
MODEL_LABEL: Final = "qwen-vl-serving/model"
NODE_GROUP_LABEL: Final = "qwen-vl-serving/node-group"
NODE_ROLE_LABEL: Final = "qwen-vl-serving/role"
EFA_LABEL: Final = "qwen-vl-serving/efa"
INSTANCE_TYPE_LABEL: Final = "node.kubernetes.io/instance-type"
ZONE_LABEL: Final = "topology.kubernetes.io/zone"
# LeaderWorkerSet's own labels (kubernetes-sigs/lws).
LWS_NAME_LABEL: Final = "leaderworkerset.sigs.k8s.io/name"
LWS_WORKER_INDEX_LABEL: Final = "leaderworkerset.sigs.k8s.io/worker-index"
LWS_GROUP_INDEX_LABEL: Final = "leaderworkerset.sigs.k8s.io/group-index"

SYSTEM_ROLE: Final = "system"
GPU_ROLE: Final = "gpu"


def system_node_selector() -> dict[str, str]:
    """Pods of the gateway, Redis, the web UI, monitoring and add-on controllers run here."""
    return {NODE_ROLE_LABEL: SYSTEM_ROLE}


def gpu_node_selector() -> dict[str, str]:
    return {NODE_ROLE_LABEL: GPU_ROLE}


# Every GPU node carries this taint so only pods that ask for GPUs land there.
GPU_TAINT_KEY: Final = "nvidia.com/gpu"
GPU_TAINT_VALUE: Final = "true"
GPU_TAINT_EFFECT: Final = "NoSchedule"

# Extended resources.
GPU_RESOURCE: Final = "nvidia.com/gpu"
EFA_RESOURCE: Final = "vpc.amazonaws.com/efa"
HUGEPAGES_RESOURCE: Final = "hugepages-2Mi"

# Ports.
VLLM_PORT: Final = 8000
MASTER_PORT: Final = 29501
GATEWAY_PORT: Final = 8080
GATEWAY_STATUS_PORT: Final = 8081
GATEWAY_QUOTA_PORT: Final = 8082  # the quota sidecar, on the pod's loopback
GATEWAY_METRICS_PORT: Final = 9145  # the routing tier's Prometheus metrics
GATEWAY_SERVICE_PORT: Final = 80
GATEWAY_TLS_PORT: Final = 443
NGINX_EXPORTER_PORT: Final = 9113
REDIS_PORT: Final = 6379
REDIS_EXPORTER_PORT: Final = 9121
NODE_EXPORTER_PORT: Final = 9100
PROMETHEUS_PORT: Final = 9090
GRAFANA_PORT: Final = 3000
WEBUI_PORT: Final = 8080

# Service and workload names that others resolve by DNS.
GATEWAY_NAME: Final = "gateway"
REDIS_NAME: Final = "redis"
WEBUI_NAME: Final = "webui"

# Generated credentials: letters and digits only, as they go into headers, URLs and config files.
PASSWORD_LENGTH: Final = 40

# Secrets (built from Pulumi secrets; referenced, never inlined).
GATEWAY_KEYS_SECRET: Final = "gateway-api-keys"
ENGINE_SECRET: Final = "vllm-engine"
REDIS_SECRET: Final = "redis-auth"
WEBUI_SECRET: Final = "webui"
ENGINE_API_KEY_ENTRY: Final = "VLLM_API_KEY"
HF_TOKEN_ENTRY: Final = "HF_TOKEN"

MONITORING_NAMESPACE: Final = "monitoring"
KEDA_NAMESPACE: Final = "keda"
SYSTEM_NAMESPACE: Final = "kube-system"


def lws_name(deployment: str) -> str:
    """The LeaderWorkerSet of a deployment; LWS also names the group's headless Service so."""
    return deployment


def leader_service_name(deployment: str) -> str:
    """Headless Service over a deployment's leader pods (the gateway's upstream, metrics)."""
    return f"{deployment}-leader"


def service_host(name: str, namespace: str) -> str:
    return f"{name}.{namespace}.svc.cluster.local"


def leader_address(deployment: str, namespace: str, group: int = 0) -> str:
    """DNS name of group `group`'s leader pod, as LWS publishes it (LWS_LEADER_ADDRESS)."""
    lws = lws_name(deployment)
    return f"{lws}-{group}.{lws}.{namespace}"


def gateway_internal_url(namespace: str) -> str:
    return f"http://{service_host(GATEWAY_NAME, namespace)}"


def common_labels(component: str, name: str) -> dict[str, str]:
    return {NAME_LABEL: name, COMPONENT_LABEL: component, PART_OF_LABEL: PART_OF}


# vLLM engine pods (components/vllm_*.py); monitors and the gateway select and probe them.
ENGINE_COMPONENT: Final = "engine"
ENGINE_ROLE_LABEL: Final = "qwen-vl-serving/engine-role"  # "leader" or "worker"
VLLM_PORT_NAME: Final = "http"
VLLM_HEALTH_PATH: Final = "/health"  # open even with an API key (docs/reference/vllm.md#open-paths)
VLLM_METRICS_PATH: Final = "/metrics"  # served by the leader only


def engine_secret_name(deployment: str) -> str:
    """A deployment's engine Secret (VLLM_API_KEY, HF_TOKEN); one per LeaderWorkerSet."""
    return f"{ENGINE_SECRET}-{deployment}"


# Platform add-ons (components/cluster_addons.py) that other stages find by name.
# DCGM exporter: a DaemonSet on GPU nodes; its Service is named after the release.
DCGM_EXPORTER_NAME: Final = "dcgm-exporter"
DCGM_EXPORTER_NAMESPACE: Final = SYSTEM_NAMESPACE
DCGM_EXPORTER_PORT: Final = 9400
LWS_NAMESPACE: Final = "lws-system"


# Redis and the web UI (components/redis.py, components/webui.py).
REDIS_CONFIG_SECRET: Final = "redis-config"  # redis.conf + exporter/admin passwords (server only)
# Opt-in label for application pods of the namespace that use the vision/session caches;
# Redis's NetworkPolicy admits pods carrying it with the value "true".
REDIS_CLIENT_LABEL: Final = "qwen-vl-serving/redis-client"
WEBUI_API_KEY_ID: Final = "webui"  # the gateway key (gateway.apiKeyIds) the web UI calls with
STORAGE_PROVISIONER: Final = "ebs.csi.aws.com"
NAMESPACE_NAME_LABEL: Final = "kubernetes.io/metadata.name"  # set by Kubernetes on namespaces
# prometheus-operator labels the Prometheus pods it runs with this name.
PROMETHEUS_POD_LABELS: Final = {NAME_LABEL: "prometheus"}
# The web UI's component label (components/webui.py); NetworkPolicies select its pods by it.
WEBUI_COMPONENT: Final = "chat-ui"
# CoreDNS of EKS (the managed add-on) keeps the kube-dns label its pods always had.
KUBE_DNS_POD_LABELS: Final = {"k8s-app": "kube-dns"}
DNS_PORT: Final = 53
# The model store (S3, the Hugging Face Hub) is reached over HTTPS.
HTTPS_PORT: Final = 443


# The EKS node group API refuses labels in these domains and their subdomains (e.g.
# node-role.kubernetes.io/x); kubelet sets the ones we need itself.
RESERVED_LABEL_DOMAINS: Final = ("kubernetes.io", "k8s.io", "eks.amazonaws.com")


def is_reserved_label(key: str) -> bool:
    """A label key the EKS node group API refuses."""
    domain = key.split("/", 1)[0] if "/" in key else ""
    return any(domain == d or domain.endswith(f".{d}") for d in RESERVED_LABEL_DOMAINS)


# vLLM paths that are open even with --api-key (docs/reference/vllm.md#open-paths) plus the
# LoRA admin routes that the gateway's own engine key would otherwise unlock for every client.
# Refused at the root and under /<deployment>/; everything not routed is refused as well.
BLOCKED_PATHS: Final = (
    "/invocations",
    "/scale_elastic_ep",
    "/is_scaling_elastic_ep",
    "/tokenize",
    "/detokenize",
    "/load",
    "/metrics",
    "/ping",
    "/version",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
)
# First path segments the gateway answers itself or refuses: /<deployment>/v1/ would clash.
RESERVED_ROUTE_NAMES: Final = frozenset(
    {"v1", "healthz", "chat", "generate"} | {path.split("/")[1] for path in BLOCKED_PATHS}
)


# HTTP header names nginx exposes as $http_<name> (no underscores: nginx drops those).
HEADER_NAME: Final = re.compile(r"^[A-Za-z0-9]+(-[A-Za-z0-9]+)*$")
# API key ids become nginx map keys and Prometheus label values: DNS-label shaped.
KEY_ID: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


# fullnameOverride: the chart names its objects "<this>-prometheus", "<this>-operator", ...
MONITORING_FULLNAME: Final = "monitoring"
PROMETHEUS_SERVICE: Final = f"{MONITORING_FULLNAME}-prometheus"


# The vision tier (docs/vision.md): encoder-only vLLM pods, the shared vision cache volume.
ENCODER_COMPONENT: Final = "vision-encoder"
VISION_CACHE_COMPONENT: Final = "vision-cache"
VISION_CACHE_CLAIM: Final = "vision-cache"  # one ReadWriteMany claim in the serving namespace
VISION_CACHE_MOUNT: Final = "/vision-cache"
VISION_CACHE_STORAGE_CLASS: Final = "efs-vision-cache"
EFS_PROVISIONER: Final = "efs.csi.aws.com"
NFS_PORT: Final = 2049  # EFS mount targets (docs/reference/vision-tier.md#efs)
EC_CONNECTOR_CONFIGMAP: Final = "vision-ec-connector"
EC_CONNECTOR_MOUNT: Final = "/opt/qwen-vl-serving/ec"  # on PYTHONPATH in engine and encoder pods


def encoder_name(deployment: str) -> str:
    """A deployment's encoder tier: its Deployment, headless Service and ScaledObject."""
    return f"{deployment}-encoder"


def vision_expiry_name(deployment: str) -> str:
    """The CronJob that expires and bounds a deployment's part of the vision cache."""
    return f"{deployment}-vision-expiry"
