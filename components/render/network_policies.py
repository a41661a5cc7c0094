"""NetworkPolicies of the serving namespace: deny everything, then allow each channel by name.

Pure: settings in, standard Kubernetes manifests (camelCase) out. Every selector is built from
the labels the pods are rendered with (stacks/naming.py, components/render/vllm_pods.py,
gateway_pod.py, redis_pod.py) or that LeaderWorkerSet puts on them, and every port from
stacks/naming.py, so a policy and the pods it selects cannot drift apart.

The channels, who may use them and why: docs/security.md. In short:
- `default-deny`: every pod of the namespace, ingress and egress; each policy below opens one
  channel (Kubernetes policies are additive: a connection passes if the sender's egress and the
  receiver's ingress both allow it).
- engines: the leaders' HTTP port only from the gateway (and Prometheus, which scrapes /metrics
  on the same port); each multi-node group's pods reach each other on every port, and no other
  group's; egress to HTTPS anywhere (the model store: S3, the Hugging Face Hub; a NetworkPolicy
  cannot name hosts), to Redis when LMCache uses it, and to DNS.
- Redis: only from its declared clients; its exporter only from Prometheus.
- the gateway: its port from anywhere (its NLB keeps the client address) and from every pod;
  it reaches the leaders and DNS.
- the web UI: its port from the VPC (its NLB's traffic arrives from the nodes) when it has a load
  balancer; it reaches the gateway, Redis and DNS.

Same group: LWS labels every pod of group i with `leaderworkerset.sigs.k8s.io/group-index: i`
(leader and workers), and a policy can only match labels, not compare them between peers. So
there is one policy per group index from 0 to the most groups the deployment can have (KEDA's
maxReplicas, or `replicas` without KEDA). A group beyond that gets no inter-rank policy: its ranks
cannot connect and the group never starts (fails closed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from components.render.gateway_pod import COMPONENT as GATEWAY_COMPONENT
from components.render.redis_pod import COMPONENT as REDIS_COMPONENT
from components.render.vision_flags import disaggregated
from components.render.vision_tier import encoder_labels
from components.render.vllm_command import LEADER
from stacks.naming import (
    COMPONENT_LABEL,
    DEPLOYMENT_LABEL,
    DNS_PORT,
    ENGINE_COMPONENT,
    ENGINE_ROLE_LABEL,
    GATEWAY_METRICS_PORT,
    GATEWAY_NAME,
    GATEWAY_PORT,
    HTTPS_PORT,
    KUBE_DNS_POD_LABELS,
    LWS_GROUP_INDEX_LABEL,
    LWS_NAME_LABEL,
    MONITORING_NAMESPACE,
    NAME_LABEL,
    NAMESPACE_NAME_LABEL,
    NGINX_EXPORTER_PORT,
    PART_OF,
    PART_OF_LABEL,
    PROMETHEUS_POD_LABELS,
    REDIS_CLIENT_LABEL,
    REDIS_EXPORTER_PORT,
    REDIS_NAME,
    REDIS_PORT,
    SYSTEM_NAMESPACE,
    VLLM_PORT,
    WEBUI_COMPONENT,
    WEBUI_NAME,
    WEBUI_PORT,
    lws_name,
)
from stacks.schema import DeploymentSettings, Settings

API_VERSION: Final = "networking.k8s.io/v1"
KIND: Final = "NetworkPolicy"
DEFAULT_DENY: Final = "default-deny"
REDIS_POLICY: Final = REDIS_NAME  # its object name since before this module existed
ANYWHERE: Final = "0.0.0.0/0"

Manifest = dict[str, Any]
Peer = dict[str, Any]
Rule = dict[str, Any]


# --- who is who -----------------------------------------------------------------------------------


def gateway_selector() -> dict[str, str]:
    return {NAME_LABEL: GATEWAY_NAME, COMPONENT_LABEL: GATEWAY_COMPONENT}


def redis_selector() -> dict[str, str]:
    return {NAME_LABEL: REDIS_NAME, COMPONENT_LABEL: REDIS_COMPONENT}


def webui_selector() -> dict[str, str]:
    return {NAME_LABEL: WEBUI_NAME, COMPONENT_LABEL: WEBUI_COMPONENT}


def engine_selector(deployment: str) -> dict[str, str]:
    """Every pod of one deployment (leaders and workers), by vllm_pods.deployment_labels."""
    return {COMPONENT_LABEL: ENGINE_COMPONENT, DEPLOYMENT_LABEL: deployment}


def leader_selector(deployment: str) -> dict[str, str]:
    """The leaders of one deployment: only they run the HTTP server (vllm_pods.pod_labels)."""
    return {**engine_selector(deployment), ENGINE_ROLE_LABEL: LEADER}


def group_selector(deployment: str, group: int) -> dict[str, str]:
    """The pods of one LWS group, by the labels the LWS controller sets on leader and workers."""
    return {LWS_NAME_LABEL: lws_name(deployment), LWS_GROUP_INDEX_LABEL: str(group)}


def prometheus_peer() -> Peer:
    return {
        "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: MONITORING_NAMESPACE}},
        "podSelector": {"matchLabels": dict(PROMETHEUS_POD_LABELS)},
    }


def dns_peer() -> Peer:
    return {
        "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: SYSTEM_NAMESPACE}},
        "podSelector": {"matchLabels": dict(KUBE_DNS_POD_LABELS)},
    }


def pods(labels: Mapping[str, str]) -> Peer:
    return {"podSelector": {"matchLabels": dict(labels)}}


def tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": p} for p in ports]


def dns_egress() -> Rule:
    return {
        "to": [dns_peer()],
        "ports": [{"protocol": "UDP", "port": DNS_PORT}, {"protocol": "TCP", "port": DNS_PORT}],
    }


def max_groups(settings: Settings, d: DeploymentSettings) -> int:
    """The most LWS groups a deployment can have: KEDA scales up to maxReplicas."""
    if settings.autoscaling.keda:
        return max(d.replicas, d.autoscaling.max_replicas)
    return d.replicas


def policy(
    name: str,
    namespace: str,
    selector: Mapping[str, str],
    *,
    ingress: Sequence[Rule] | None = None,
    egress: Sequence[Rule] | None = None,
) -> Manifest:
    """A NetworkPolicy; `None` leaves a direction alone, `[]` isolates it with no rule."""
    types = [t for t, rules in (("Ingress", ingress), ("Egress", egress)) if rules is not None]
    spec: dict[str, Any] = {"podSelector": {"matchLabels": dict(selector)}, "policyTypes": types}
    if ingress:
        spec["ingress"] = list(ingress)
    if egress:
        spec["egress"] = list(egress)
    if not selector:
        spec["podSelector"] = {}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": {PART_OF_LABEL: PART_OF}},
        "spec": spec,
    }


# --- the policies ---------------------------------------------------------------------------------


def build_redis_policy(
    namespace: str, *, webui_clients: bool, engine_clients: Sequence[str], monitoring: bool
) -> Manifest:
    """Redis: its port from its declared clients, its exporter's from Prometheus.

    Clients: pods labelled REDIS_CLIENT_LABEL=true (application pods of the namespace), the web
    UI when it runs, and the engines of the deployments that use it as LMCache's backend.
    """
    clients: list[Peer] = [pods({REDIS_CLIENT_LABEL: "true"})]
    if webui_clients:
        clients.append(pods(webui_selector()))
    if engine_clients:
        clients.append(
            {
                "podSelector": {
                    "matchLabels": {COMPONENT_LABEL: ENGINE_COMPONENT},
                    "matchExpressions": [
                        {
                            "key": DEPLOYMENT_LABEL,
                            "operator": "In",
                            "values": sorted(engine_clients),
                        }
                    ],
                }
            }
        )
    ingress: list[Rule] = [{"from": clients, "ports": tcp(REDIS_PORT)}]
    if monitoring:
        ingress.append({"from": [prometheus_peer()], "ports": tcp(REDIS_EXPORTER_PORT)})
    return policy(REDIS_POLICY, namespace, redis_selector(), ingress=ingress)


def redis_engine_clients(settings: Settings) -> tuple[str, ...]:
    """Deployments whose engines use Redis as LMCache's remote KV backend."""
    return tuple(d.name for d in settings.serving.deployments if d.kv_offload_redis)


def redis_policy_for(settings: Settings) -> Manifest:
    return build_redis_policy(
        settings.serving.namespace,
        webui_clients=settings.webui.enabled,
        engine_clients=redis_engine_clients(settings),
        monitoring=settings.monitoring.enabled,
    )


def lb_sources(settings: Settings) -> list[Peer]:
    """Where a load balancer's connections come from, for an NLB with instance targets.

    The web UI's Service keeps the default externalTrafficPolicy (Cluster): kube-proxy
    rewrites the source to a node address, inside the VPC. An existing VPC's CIDR is not in
    the settings, so there the rule cannot be narrower than anywhere.
    """
    cidr = settings.network.cidr if settings.network.mode == "new" else ANYWHERE
    return [{"ipBlock": {"cidr": cidr}}]


def _engine_policies(settings: Settings, d: DeploymentSettings) -> list[Manifest]:
    ns, monitoring = settings.serving.namespace, settings.monitoring.enabled
    http_from = [pods(gateway_selector()), *([prometheus_peer()] if monitoring else [])]
    egress: list[Rule] = [
        # the model store: S3 (through the VPC endpoint or the NAT) and the Hugging Face Hub
        {"to": [{"ipBlock": {"cidr": ANYWHERE}}], "ports": tcp(HTTPS_PORT)},
        dns_egress(),
    ]
    if d.kv_offload_redis and settings.redis.enabled:
        egress.append({"to": [pods(redis_selector())], "ports": tcp(REDIS_PORT)})
    found = [
        policy(
            f"engine-{d.name}-http",
            ns,
            leader_selector(d.name),
            ingress=[{"from": http_from, "ports": tcp(VLLM_PORT)}],
        ),
        policy(f"engine-{d.name}-egress", ns, engine_selector(d.name), egress=egress),
    ]
    if d.nodes_per_group > 1:
        for group in range(max_groups(settings, d)):
            same = [pods(group_selector(d.name, group))]
            found.append(
                policy(
                    f"engine-{d.name}-group-{group}",
                    ns,
                    group_selector(d.name, group),
                    ingress=[{"from": same}],  # every port: rendezvous, NCCL, vLLM's RPC
                    egress=[{"to": same}],
                )
            )
    return found


def _encoder_policies(settings: Settings, d: DeploymentSettings) -> list[Manifest]:
    """The encoder tier: the same HTTP channel as the leaders (the gateway's encoder step and
    Prometheus) and the same egress (weights, DNS). The shared cache is not a pod channel: the
    EFS CSI driver mounts it on the node, where the EFS security group admits only the nodes."""
    ns, labels = settings.serving.namespace, encoder_labels(d)
    http_from = [
        pods(gateway_selector()),
        *([prometheus_peer()] if settings.monitoring.enabled else []),
    ]
    egress: list[Rule] = [
        {"to": [{"ipBlock": {"cidr": ANYWHERE}}], "ports": tcp(HTTPS_PORT)},
        dns_egress(),
    ]
    return [
        policy(
            f"encoder-{d.name}-http",
            ns,
            labels,
            ingress=[{"from": http_from, "ports": tcp(VLLM_PORT)}],
            egress=egress,
        )
    ]


def _gateway_policy(settings: Settings) -> Manifest:
    monitoring = settings.monitoring.enabled
    ingress: list[Rule] = [
        # The NLB keeps the client's address (externalTrafficPolicy Local), and in-cluster
        # clients of every namespace use the Service: the port is the door, API keys guard it.
        {
            "from": [{"ipBlock": {"cidr": ANYWHERE}}, {"namespaceSelector": {}}],
            "ports": tcp(GATEWAY_PORT),
        }
    ]
    if monitoring:
        # the exporter's stub_status metrics and the routing tier's own
        ports = tcp(NGINX_EXPORTER_PORT, GATEWAY_METRICS_PORT)
        ingress.append({"from": [prometheus_peer()], "ports": ports})
    leaders = [pods(leader_selector(d.name)) for d in settings.serving.deployments]
    # the vision tier's encoder step (docs/vision.md#proxy-step)
    encoders = [pods(encoder_labels(d)) for d in settings.serving.deployments if disaggregated(d)]
    egress: list[Rule] = [{"to": leaders + encoders, "ports": tcp(VLLM_PORT)}, dns_egress()]
    return policy(
        GATEWAY_NAME, settings.serving.namespace, gateway_selector(), ingress=ingress, egress=egress
    )


def _webui_policy(settings: Settings) -> Manifest:
    ingress: list[Rule] = []
    if settings.webui.exposure == "loadBalancer":
        ingress.append({"from": lb_sources(settings), "ports": tcp(WEBUI_PORT)})
    # exposure internal: `kubectl port-forward` enters the pod through the kubelet, not the network
    egress: list[Rule] = [
        {"to": [pods(gateway_selector())], "ports": tcp(GATEWAY_PORT)},
        {"to": [pods(redis_selector())], "ports": tcp(REDIS_PORT)},
        dns_egress(),
    ]
    return policy(
        WEBUI_NAME, settings.serving.namespace, webui_selector(), ingress=ingress, egress=egress
    )


def _redis_client_policy(settings: Settings) -> Manifest:
    """Application pods that opt in to Redis (REDIS_CLIENT_LABEL) may send to it (and to DNS)."""
    return policy(
        "redis-clients",
        settings.serving.namespace,
        {REDIS_CLIENT_LABEL: "true"},
        egress=[{"to": [pods(redis_selector())], "ports": tcp(REDIS_PORT)}, dns_egress()],
    )


def build_namespace_policies(settings: Settings) -> list[Manifest]:
    """Every NetworkPolicy of the serving namespace except Redis's (components/redis.py registers
    that one, from build_redis_policy, under its original resource name)."""
    ns = settings.serving.namespace
    found = [policy(DEFAULT_DENY, ns, {}, ingress=[], egress=[]), _gateway_policy(settings)]
    for d in settings.serving.deployments:
        found += _engine_policies(settings, d)
        if disaggregated(d):
            found += _encoder_policies(settings, d)
    if settings.redis.enabled:
        found.append(_redis_client_policy(settings))
    if settings.webui.enabled and settings.redis.enabled:
        found.append(_webui_policy(settings))
    return found


def build_network_policies(settings: Settings) -> list[Manifest]:
    """All NetworkPolicies of the stack, Redis's included: what the cluster gets."""
    found = build_namespace_policies(settings)
    if settings.redis.enabled:
        found.append(redis_policy_for(settings))
    return found
