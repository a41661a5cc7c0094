"""The gateway's pod: nginx plus its exporter sidecar, its start and drain scripts, and the
NLB annotations of its LoadBalancer Service (pure: plain dicts in Pulumi's input form).

components/gateway.py wraps these in Kubernetes resources; the rehearsal runs the same start
script and exporter arguments on loopback.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from components.render.nginx_conf import (
    API_KEYS_FILE,
    CONF_DIR,
    CONF_FILE,
    ENGINE_AUTH_FILE,
    HEALTH_PATH,
    QUOTA_FILE,
    QUOTA_SOURCE,
    RESOLVER_FILE,
    RESOLVER_TEMPLATE,
    ROUTER_FILE,
    ROUTES_FILE,
    STATUS_PATH,
    NginxConfArgs,
    render_nginx_conf,
    render_routes_js,
    router_source,
    sidecar_enabled,
)
from components.render.redis_conf import APP_USER, PASSWORD_ENTRY
from stacks.naming import (
    GATEWAY_KEYS_SECRET,
    GATEWAY_METRICS_PORT,
    GATEWAY_NAME,
    GATEWAY_PORT,
    GATEWAY_TLS_PORT,
    NGINX_EXPORTER_PORT,
    REDIS_CLIENT_LABEL,
    REDIS_SECRET,
    ZONE_LABEL,
    system_node_selector,
)


@dataclass(frozen=True, kw_only=True)
class GatewayPod:
    """What the pod is made of: the nginx config's arguments and the two images."""

    conf: NginxConfArgs  # cluster upstream mode, default pod paths
    image: str  # nginx >= 1.27.3 (upstream `resolve`) with njs >= 0.8 (the official image)
    exporter_image: str
    replicas: int = 1  # the quota sidecar's per-replica share when Redis is down
    quota_image: str | None = None  # Python; needed when a key has a quota
    redis_address: str = ""  # host:port of the stack's Redis (quotas)


COMPONENT = "gateway"


CONFIG_MAP_NAME = f"{GATEWAY_NAME}-nginx"


LB_SERVICE_NAME = f"{GATEWAY_NAME}-nlb"


HTTP_PORT_NAME = "http"


METRICS_PORT_NAME = "metrics"


ROUTER_METRICS_PORT_NAME = "router-metrics"


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


def config_files(conf: NginxConfArgs) -> dict[str, str]:
    """The ConfigMap's files: nginx's config, the routing tier and its data, the quota sidecar."""
    return {
        CONF_FILE: render_nginx_conf(conf),
        ROUTER_FILE: router_source(),
        ROUTES_FILE: render_routes_js(conf),
        QUOTA_FILE: QUOTA_SOURCE.read_text(),
    }


def quota_container(args: GatewayPod) -> dict[str, Any]:
    """The quota sidecar: per-key requests per minute in Redis, shared by all replicas."""
    if not args.quota_image or not args.redis_address:
        raise ValueError(
            "the quota sidecar needs an image and Redis' address (quotas, shared placement)"
        )
    limits = [
        f"--limit={key_id}={k.requests_per_minute}"
        for key_id, k in sorted(args.conf.keys.items())
        if k.requests_per_minute
    ]
    return {
        "name": "quota",
        "image": args.quota_image,
        "command": [
            "python3",
            f"{CONF_DIR}/{QUOTA_FILE}",
            f"--listen={args.conf.quota_address}",
            f"--redis={args.redis_address}",
            f"--replicas={args.replicas}",
            *limits,
        ],
        "env": [
            {"name": "QUOTA_REDIS_USER", "value": APP_USER},
            {
                "name": "QUOTA_REDIS_PASSWORD",
                "value_from": {"secret_key_ref": {"name": REDIS_SECRET, "key": PASSWORD_ENTRY}},
            },
        ],
        "resources": {"requests": {"cpu": "50m", "memory": "48Mi"}, "limits": {"memory": "96Mi"}},
        "security_context": _HARDENED,
        "volume_mounts": [{"name": "config", "mount_path": CONF_DIR, "read_only": True}],
    }


def pod_labels(args: GatewayPod) -> dict[str, str]:
    """Extra pod labels: the quota sidecar is a Redis client (Redis' NetworkPolicy admits it)."""
    return {REDIS_CLIENT_LABEL: "true"} if sidecar_enabled(args.conf) else {}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


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


def _probe(period_seconds: int, failure_threshold: int) -> dict[str, Any]:
    return {
        "http_get": {"path": HEALTH_PATH, "port": HTTP_PORT_NAME},
        "timeout_seconds": 2,
        "period_seconds": period_seconds,
        "failure_threshold": failure_threshold,
    }


_HARDENED: dict[str, Any] = {
    "allow_privilege_escalation": False,
    "read_only_root_filesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def build_pod_spec(args: GatewayPod, selector: Mapping[str, str]) -> dict[str, Any]:
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
                "ports": [
                    {"name": HTTP_PORT_NAME, "container_port": GATEWAY_PORT},
                    {"name": ROUTER_METRICS_PORT_NAME, "container_port": GATEWAY_METRICS_PORT},
                ],
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
            *([quota_container(args)] if sidecar_enabled(args.conf) else []),
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
