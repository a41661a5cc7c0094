"""The Nginx gateway: the OpenAI-compatible front door of every model deployment.

A Deployment of nginx (config rendered by components/nginx_conf.py, cluster upstream mode)
with an nginx-prometheus-exporter sidecar, on the system nodes and spread over the AZs; a
ConfigMap with the config and a Secret with the includes that carry keys (the client key map
and the engine's Authorization header), both checksummed into the pod template so any change
rolls the pods; a PodDisruptionBudget; a ClusterIP Service for in-cluster clients and a
LoadBalancer Service that the AWS cloud controller turns into an NLB.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import pulumi
import pulumi_kubernetes as k8s

from components.naming import (
    COMPONENT_LABEL,
    GATEWAY_KEYS_SECRET,
    GATEWAY_NAME,
    GATEWAY_PORT,
    GATEWAY_SERVICE_PORT,
    GATEWAY_TLS_PORT,
    NAME_LABEL,
    NGINX_EXPORTER_PORT,
    TYPE_PREFIX,
    ZONE_LABEL,
    common_labels,
    gateway_internal_url,
    system_node_selector,
)
from components.nginx_conf import (
    API_KEYS_FILE,
    CONF_DIR,
    CONF_FILE,
    ENGINE_AUTH_FILE,
    HEALTH_PATH,
    RESOLVER_FILE,
    RESOLVER_TEMPLATE,
    STATUS_PATH,
    NginxConfArgs,
    render_api_keys_map,
    render_engine_auth,
    render_nginx_conf,
)

COMPONENT = "gateway"
CONFIG_MAP_NAME = f"{GATEWAY_NAME}-nginx"
LB_SERVICE_NAME = f"{GATEWAY_NAME}-nlb"
HTTP_PORT_NAME = "http"
METRICS_PORT_NAME = "metrics"
CONFIG_CHECKSUM = "checksum/config"
SECRETS_CHECKSUM = "checksum/secrets"
# The official nginx image's unprivileged user; nginx needs no root on port 8080.
NGINX_UID = 101
# Long enough for the NLB and kube-proxy to stop sending new connections before nginx
# stops accepting them.
PRE_STOP_SECONDS = 10
# Request bodies over client_body_buffer_size are spooled here (the runtime emptyDir).
RUNTIME_VOLUME_LIMIT = "4Gi"
HOSTNAME_LABEL = "kubernetes.io/hostname"

# Annotations read by the AWS cloud controller's service controller (no AWS Load Balancer
# Controller is installed): an NLB with instance targets.
LB_ANNOTATION_PREFIX = "service.beta.kubernetes.io/aws-load-balancer-"
TLS_POLICY = "ELBSecurityPolicy-TLS13-1-2-2021-06"


@dataclass(frozen=True, kw_only=True)
class GatewayArgs:
    namespace: pulumi.Input[str]
    conf: NginxConfArgs  # cluster upstream mode, default pod paths
    replicas: int
    image: str  # nginx >= 1.27.3 (upstream `resolve`)
    exporter_image: str
    client_api_keys: Mapping[str, pulumi.Input[str]]  # key id -> key (Pulumi secrets)
    engine_api_key: pulumi.Input[str]
    scheme: Literal["internal", "internet-facing"]
    tls_certificate_arn: str | None = None
    load_balancer_tags: Mapping[str, str] = field(default_factory=dict)
    # What must exist before the pods can be scheduled (the system node group).
    depends_on: Sequence[pulumi.Resource] = ()


class Gateway(pulumi.ComponentResource):
    internal_url: pulumi.Output[str]
    load_balancer_host: pulumi.Output[str | None]
    config_checksum: str

    def __init__(
        self, name: str, args: GatewayArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(f"{TYPE_PREFIX}:gateway:Gateway", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        labels = common_labels(COMPONENT, GATEWAY_NAME)
        selector = {NAME_LABEL: GATEWAY_NAME, COMPONENT_LABEL: COMPONENT}
        conf_text = render_nginx_conf(args.conf)
        self.config_checksum = sha256(conf_text)

        k8s.core.v1.ConfigMap(
            f"{name}-config",
            metadata={"name": CONFIG_MAP_NAME, "namespace": args.namespace, "labels": labels},
            data={CONF_FILE: conf_text},
            opts=child,
        )
        includes = secret_includes(args.client_api_keys, args.engine_api_key)
        k8s.core.v1.Secret(
            f"{name}-keys",
            metadata={"name": GATEWAY_KEYS_SECRET, "namespace": args.namespace, "labels": labels},
            type="Opaque",
            string_data=includes,
            opts=child,
        )
        # A digest of 40-character random keys reveals none of them; left secret, it would
        # hide the whole Deployment spec from every preview diff.
        secrets_checksum = pulumi.Output.unsecret(
            pulumi.Output.all(*includes.values()).apply(lambda texts: sha256("".join(texts)))
        )
        k8s.apps.v1.Deployment(
            f"{name}-deployment",
            metadata={"name": GATEWAY_NAME, "namespace": args.namespace, "labels": labels},
            spec={
                "replicas": args.replicas,
                "selector": {"match_labels": selector},
                "strategy": {
                    "type": "RollingUpdate",
                    "rolling_update": {"max_unavailable": 0, "max_surge": 1},
                },
                "template": {
                    "metadata": {
                        "labels": labels,
                        "annotations": {
                            # nginx reads its files only at start: a change must roll the pods
                            CONFIG_CHECKSUM: self.config_checksum,
                            SECRETS_CHECKSUM: secrets_checksum,
                        },
                    },
                    "spec": build_pod_spec(args, selector),
                },
            },
            opts=pulumi.ResourceOptions(parent=self, depends_on=list(args.depends_on)),
        )
        k8s.policy.v1.PodDisruptionBudget(
            f"{name}-pdb",
            metadata={"name": GATEWAY_NAME, "namespace": args.namespace, "labels": labels},
            spec={"max_unavailable": 1, "selector": {"match_labels": selector}},
            opts=child,
        )
        k8s.core.v1.Service(
            f"{name}-service",
            metadata={"name": GATEWAY_NAME, "namespace": args.namespace, "labels": labels},
            spec={
                "type": "ClusterIP",
                "selector": selector,
                "ports": [
                    {
                        "name": HTTP_PORT_NAME,
                        "port": GATEWAY_SERVICE_PORT,
                        "target_port": HTTP_PORT_NAME,
                    }
                ],
            },
            opts=child,
        )
        nlb = k8s.core.v1.Service(
            f"{name}-nlb",
            metadata={
                "name": LB_SERVICE_NAME,
                "namespace": args.namespace,
                "labels": labels,
                "annotations": build_nlb_annotations(
                    args.scheme, args.tls_certificate_arn, args.load_balancer_tags
                ),
            },
            spec={
                "type": "LoadBalancer",
                # Client addresses reach nginx's log, and no second hop through another node.
                "external_traffic_policy": "Local",
                "selector": selector,
                "ports": [
                    {
                        "name": "https" if args.tls_certificate_arn else HTTP_PORT_NAME,
                        "port": GATEWAY_TLS_PORT
                        if args.tls_certificate_arn
                        else GATEWAY_SERVICE_PORT,
                        "target_port": HTTP_PORT_NAME,
                    }
                ],
            },
            opts=child,
        )

        self.internal_url = pulumi.Output.from_input(args.namespace).apply(gateway_internal_url)
        self.load_balancer_host = nlb.status.apply(_hostname)
        self.register_outputs(
            {
                "internal_url": self.internal_url,
                "load_balancer_host": self.load_balancer_host,
                "config_checksum": self.config_checksum,
            }
        )


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def secret_includes(
    client_api_keys: Mapping[str, pulumi.Input[str]], engine_api_key: pulumi.Input[str]
) -> dict[str, pulumi.Output[str]]:
    """The Secret's files: the client key map and the engine Authorization header."""
    ids = sorted(client_api_keys)
    key_map = pulumi.Output.all(*(client_api_keys[i] for i in ids)).apply(
        lambda keys: render_api_keys_map(dict(zip(ids, keys, strict=True)))
    )
    auth = pulumi.Output.from_input(engine_api_key).apply(render_engine_auth)
    return {
        API_KEYS_FILE: pulumi.Output.secret(key_map),
        ENGINE_AUTH_FILE: pulumi.Output.secret(auth),
    }


def build_nlb_annotations(
    scheme: Literal["internal", "internet-facing"],
    tls_certificate_arn: str | None,
    tags: Mapping[str, str],
) -> dict[str, str]:
    """The cloud controller's NLB annotations: scheme, cross-zone, TLS with an ACM cert, tags."""
    a = {
        f"{LB_ANNOTATION_PREFIX}type": "nlb",
        # Targets sit in every AZ the gateway is spread over; without it an AZ's clients only
        # reach that AZ's pods.
        f"{LB_ANNOTATION_PREFIX}cross-zone-load-balancing-enabled": "true",
    }
    if scheme == "internal":
        a[f"{LB_ANNOTATION_PREFIX}internal"] = "true"
    if tls_certificate_arn:
        # TLS ends at the NLB; nginx keeps speaking plain HTTP on 8080 inside the VPC.
        a[f"{LB_ANNOTATION_PREFIX}ssl-cert"] = tls_certificate_arn
        a[f"{LB_ANNOTATION_PREFIX}ssl-ports"] = str(GATEWAY_TLS_PORT)
        a[f"{LB_ANNOTATION_PREFIX}ssl-negotiation-policy"] = TLS_POLICY
        a[f"{LB_ANNOTATION_PREFIX}backend-protocol"] = "tcp"
    if tags:
        bad = [f"{k}={v}" for k, v in tags.items() if any(c in f"{k}{v}" for c in ",=")]
        if bad:
            raise ValueError(f"NLB tags cannot contain ',' or '=': {bad}")
        a[f"{LB_ANNOTATION_PREFIX}additional-resource-tags"] = ",".join(
            f"{k}={v}" for k, v in sorted(tags.items())
        )
    return a


def build_start_script(conf: NginxConfArgs, resolv_conf: str = "/etc/resolv.conf") -> str:
    """The nginx container's command: write the resolver include from the pod's first
    nameserver (kube-dns), then exec nginx as PID 1 with the mounted config."""
    runtime = conf.paths.runtime_dir
    line = RESOLVER_TEMPLATE.format(address="%s")
    return "\n".join(
        [
            "set -eu",
            "ns=",
            "while read -r key value _; do",
            '    if [ "$key" = nameserver ]; then ns=$value; break; fi',
            f"done < {resolv_conf}",
            f'[ -n "$ns" ] || {{ echo "gateway: no nameserver in {resolv_conf}" >&2; exit 1; }}',
            'case $ns in *:*) ns="[$ns]" ;; esac',
            f"printf '{line}\\n' \"$ns\" > {runtime}/{RESOLVER_FILE}",
            f"exec nginx -e stderr -c {CONF_DIR}/{CONF_FILE}",
            "",
        ]
    )


def build_pre_stop_script(
    conf: NginxConfArgs, conf_path: str = f"{CONF_DIR}/{CONF_FILE}", delay: int = PRE_STOP_SECONDS
) -> str:
    """Stop taking new connections after the load balancers have let go, then let running
    streams finish (nginx's graceful quit) before Kubernetes sends SIGTERM (a fast stop)."""
    pid = f"{conf.paths.runtime_dir}/nginx.pid"
    return f"sleep {delay}; nginx -c {conf_path} -s quit; while [ -e {pid} ]; do sleep 1; done"


def _probe(period_seconds: int, failure_threshold: int) -> k8s.core.v1.ProbeArgsDict:
    return {
        "http_get": {"path": HEALTH_PATH, "port": HTTP_PORT_NAME},
        "timeout_seconds": 2,
        "period_seconds": period_seconds,
        "failure_threshold": failure_threshold,
    }


_HARDENED: k8s.core.v1.SecurityContextArgsDict = {
    "allow_privilege_escalation": False,
    "read_only_root_filesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def build_pod_spec(args: GatewayArgs, selector: Mapping[str, str]) -> k8s.core.v1.PodSpecArgsDict:
    p = args.conf.paths
    return {
        "node_selector": system_node_selector(),
        "topology_spread_constraints": [
            {
                "max_skew": 1,
                "topology_key": ZONE_LABEL,
                "when_unsatisfiable": "DoNotSchedule",
                "label_selector": {"match_labels": dict(selector)},
            },
            {
                "max_skew": 1,
                "topology_key": HOSTNAME_LABEL,
                "when_unsatisfiable": "ScheduleAnyway",
                "label_selector": {"match_labels": dict(selector)},
            },
        ],
        # In-flight generations may run up to the read timeout after nginx's graceful quit.
        "termination_grace_period_seconds": PRE_STOP_SECONDS + args.conf.read_timeout_seconds,
        "automount_service_account_token": False,
        "security_context": {
            "run_as_non_root": True,
            "run_as_user": NGINX_UID,
            "run_as_group": NGINX_UID,
            "fs_group": NGINX_UID,
            "seccomp_profile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": "nginx",
                "image": args.image,
                "command": ["/bin/sh", "-c", build_start_script(args.conf)],
                "ports": [{"name": HTTP_PORT_NAME, "container_port": GATEWAY_PORT}],
                "readiness_probe": _probe(period_seconds=5, failure_threshold=2),
                "liveness_probe": _probe(period_seconds=10, failure_threshold=3),
                "lifecycle": {
                    "pre_stop": {
                        "exec_": {"command": ["/bin/sh", "-c", build_pre_stop_script(args.conf)]}
                    }
                },
                "resources": {
                    "requests": {"cpu": "500m", "memory": "256Mi"},
                    "limits": {"memory": "1Gi"},
                },
                "security_context": _HARDENED,
                "volume_mounts": [
                    {"name": "config", "mount_path": CONF_DIR, "read_only": True},
                    {"name": "keys", "mount_path": p.secrets_dir, "read_only": True},
                    {"name": "runtime", "mount_path": p.runtime_dir},
                ],
            },
            {
                "name": "exporter",
                "image": args.exporter_image,
                "args": [
                    f"--nginx.scrape-uri=http://{args.conf.status_listen}{STATUS_PATH}",
                    f"--web.listen-address=:{NGINX_EXPORTER_PORT}",
                ],
                "ports": [{"name": METRICS_PORT_NAME, "container_port": NGINX_EXPORTER_PORT}],
                "resources": {
                    "requests": {"cpu": "20m", "memory": "32Mi"},
                    "limits": {"memory": "64Mi"},
                },
                "security_context": _HARDENED,
            },
        ],
        "volumes": [
            {"name": "config", "config_map": {"name": CONFIG_MAP_NAME}},
            # Only the two includes, readable by nginx's group alone.
            {
                "name": "keys",
                "secret": {
                    "secret_name": GATEWAY_KEYS_SECRET,
                    "default_mode": 0o440,
                    "items": [{"key": f, "path": f} for f in (API_KEYS_FILE, ENGINE_AUTH_FILE)],
                },
            },
            {"name": "runtime", "empty_dir": {"size_limit": RUNTIME_VOLUME_LIMIT}},
        ],
    }


def _hostname(status: k8s.core.v1.outputs.ServiceStatus | None) -> str | None:
    """The NLB's DNS name once the cloud controller has published it."""
    ingress = status.load_balancer.ingress if status and status.load_balancer else None
    return ingress[0].hostname if ingress else None
