"""Open WebUI: the seeds' chat interface (image upload, multi-turn chat) on the gateway's API.

It talks to the gateway's internal URL with an API key of its own, keeps users, chats and
uploads in SQLite on a gp3 volume, and its websocket state in Redis. It is reached through
an internal NLB of its own (exposure loadBalancer) or only its ClusterIP Service: it cannot
live at /ui/ on the gateway, because Open WebUI has no base-path setting (its pages load
/_app/, /api/ and /ws/socket.io from the site root; open-webui/open-webui#1162, #17257).
The admin account comes from WEBUI_ADMIN_EMAIL/PASSWORD, which Open WebUI reads from 0.7.0
on; with signup off, older images start with no account at all (the rules warn).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import pulumi
import pulumi_kubernetes as k8s

from components.gateway import build_nlb_annotations
from components.redis import gp3_storage_class
from stacks.naming import (
    COMPONENT_LABEL,
    NAME_LABEL,
    TYPE_PREFIX,
    WEBUI_COMPONENT,
    WEBUI_NAME,
    WEBUI_PORT,
    WEBUI_SECRET,
    common_labels,
    system_node_selector,
)

COMPONENT = WEBUI_COMPONENT
DATA_DIR = "/app/backend/data"  # the image's DATA_DIR: SQLite database, uploads, caches
PORT_NAME = "http"
LB_PORT = 80
LB_NAME = f"{WEBUI_NAME}-nlb"
# Secret entries are named after the environment variables that read them.
API_KEY_ENTRY = "OPENAI_API_KEY"
SECRET_KEY_ENTRY = "WEBUI_SECRET_KEY"
ADMIN_PASSWORD_ENTRY = "WEBUI_ADMIN_PASSWORD"
REDIS_URL_ENTRY = "REDIS_URL"


@dataclass(frozen=True, kw_only=True)
class WebUiArgs:
    namespace: pulumi.Input[str]
    image: str
    replicas: int
    volume_gib: int
    exposure: Literal["loadBalancer", "internal"]
    openai_base_url: str  # the gateway's internal URL + /v1
    api_key: pulumi.Input[str]  # the gateway key issued to the web UI
    admin_email: str
    admin_password: pulumi.Input[str]
    secret_key: pulumi.Input[str]  # signs its sessions and JWTs
    redis_url: pulumi.Input[str]  # redis://app:<password>@redis:6379/0
    load_balancer_tags: Mapping[str, str]  # AWS tags of the NLB
    protect: bool  # keep the volume (users, chats, uploads) when Pulumi deletes it


class WebUi(pulumi.ComponentResource):
    internal_url: str  # relative to the namespace's DNS search path
    load_balancer_host: pulumi.Output[str | None]

    def __init__(
        self, name: str, args: WebUiArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(f"{TYPE_PREFIX}:webui:WebUi", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        kept = pulumi.ResourceOptions(
            parent=self, protect=args.protect, retain_on_delete=args.protect
        )
        labels = common_labels(COMPONENT, WEBUI_NAME)
        selector = {NAME_LABEL: WEBUI_NAME, COMPONENT_LABEL: COMPONENT}

        k8s.core.v1.Secret(
            f"{name}-secret",
            metadata={"name": WEBUI_SECRET, "namespace": args.namespace, "labels": labels},
            type="Opaque",
            string_data={
                API_KEY_ENTRY: args.api_key,
                SECRET_KEY_ENTRY: args.secret_key,
                ADMIN_PASSWORD_ENTRY: args.admin_password,
                REDIS_URL_ENTRY: args.redis_url,
            },
            opts=child,
        )
        storage = gp3_storage_class(
            f"{name}-storage",
            pulumi.Output.concat(args.namespace, "-webui-gp3"),
            labels,
            protect=args.protect,
            opts=kept,
        )
        claim = k8s.core.v1.PersistentVolumeClaim(
            f"{name}-data",
            metadata={"name": f"{WEBUI_NAME}-data", "namespace": args.namespace, "labels": labels},
            spec={
                "access_modes": ["ReadWriteOnce"],
                "storage_class_name": storage.metadata.name,
                "resources": {"requests": {"storage": f"{args.volume_gib}Gi"}},
            },
            # WaitForFirstConsumer: the claim binds once the pod is scheduled. pulumi-kubernetes
            # takes a Pending claim of such a class as ready (pulumi/pulumi-kubernetes#3130), so
            # the Deployment that binds it is not deadlocked behind it.
            opts=kept,
        )
        k8s.apps.v1.Deployment(
            f"{name}-deployment",
            metadata={"name": WEBUI_NAME, "namespace": args.namespace, "labels": labels},
            spec={
                "replicas": args.replicas,
                # the volume is ReadWriteOnce: the old pod must let go before the new one starts
                "strategy": {"type": "Recreate"},
                "selector": {"match_labels": selector},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": _pod_spec(args, claim.metadata.name),
                },
            },
            opts=child,
        )
        service_spec: k8s.core.v1.ServiceSpecArgsDict = {
            "selector": selector,
            "ports": [{"name": PORT_NAME, "port": WEBUI_PORT, "target_port": PORT_NAME}],
        }
        k8s.core.v1.Service(
            f"{name}-service",
            metadata={"name": WEBUI_NAME, "namespace": args.namespace, "labels": labels},
            spec={**service_spec, "type": "ClusterIP"},
            opts=child,
        )
        self.internal_url = f"http://{WEBUI_NAME}:{WEBUI_PORT}"
        self.load_balancer_host = pulumi.Output.from_input(None)
        if args.exposure == "loadBalancer":
            nlb = k8s.core.v1.Service(
                f"{name}-nlb",
                metadata={
                    "name": LB_NAME,
                    "namespace": args.namespace,
                    "labels": labels,
                    # the gateway's NLB annotations, always inside the VPC
                    "annotations": build_nlb_annotations("internal", None, args.load_balancer_tags),
                },
                spec={
                    "type": "LoadBalancer",
                    "selector": selector,
                    "ports": [{"name": PORT_NAME, "port": LB_PORT, "target_port": PORT_NAME}],
                },
                opts=child,
            )
            self.load_balancer_host = nlb.status.apply(_hostname)
        self.register_outputs(
            {"internal_url": self.internal_url, "load_balancer_host": self.load_balancer_host}
        )


def _hostname(status: k8s.core.v1.outputs.ServiceStatus | None) -> str | None:
    """The NLB's DNS name once the cloud controller has published it."""
    ingress = status.load_balancer.ingress if status and status.load_balancer else None
    return ingress[0].hostname if ingress else None


def _env(args: WebUiArgs) -> list[k8s.core.v1.EnvVarArgsDict]:
    """Open WebUI's settings. Names from its backend/open_webui/env.py and config.py, as
    documented at https://docs.openwebui.com/getting-started/env-configuration and
    https://docs.openwebui.com/tutorials/integrations/redis (WEBSOCKET_MANAGER=redis,
    WEBSOCKET_REDIS_URL, REDIS_URL; "in practice it is recommended to set both")."""

    def secret(entry: str) -> k8s.core.v1.EnvVarSourceArgsDict:
        return {"secret_key_ref": {"name": WEBUI_SECRET, "key": entry}}

    plain = {
        "DATA_DIR": DATA_DIR,
        # The stack is the source of truth: without this, values saved in the database on the
        # first start (base URL, API key, signup) override the environment forever after.
        "ENABLE_PERSISTENT_CONFIG": "False",
        "ENABLE_OLLAMA_API": "False",
        "ENABLE_OPENAI_API": "True",
        "OPENAI_API_BASE_URL": args.openai_base_url,
        "ENABLE_SIGNUP": "False",
        "WEBUI_ADMIN_EMAIL": args.admin_email,
        "ENABLE_WEBSOCKET_SUPPORT": "True",
        "WEBSOCKET_MANAGER": "redis",
    }
    secrets = {
        "OPENAI_API_KEY": API_KEY_ENTRY,
        "WEBUI_SECRET_KEY": SECRET_KEY_ENTRY,
        "WEBUI_ADMIN_PASSWORD": ADMIN_PASSWORD_ENTRY,
        "REDIS_URL": REDIS_URL_ENTRY,
        "WEBSOCKET_REDIS_URL": REDIS_URL_ENTRY,
    }
    return [
        *({"name": k, "value": v} for k, v in plain.items()),
        *({"name": k, "value_from": secret(entry)} for k, entry in secrets.items()),
    ]


def _pod_spec(args: WebUiArgs, claim: pulumi.Input[str]) -> k8s.core.v1.PodSpecArgsDict:
    health: k8s.core.v1.HTTPGetActionArgsDict = {"path": "/health", "port": PORT_NAME}
    container: k8s.core.v1.ContainerArgsDict = {
        "name": "open-webui",
        "image": args.image,
        "ports": [{"name": PORT_NAME, "container_port": WEBUI_PORT}],
        "env": _env(args),
        "volume_mounts": [{"name": "data", "mount_path": DATA_DIR}],
        "resources": {"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
        # first start runs database migrations and fetches the RAG embedding model
        "startup_probe": {"http_get": health, "period_seconds": 10, "failure_threshold": 60},
        "readiness_probe": {"http_get": health, "period_seconds": 10},
        "liveness_probe": {"http_get": health, "period_seconds": 20, "failure_threshold": 3},
        "security_context": {
            "allow_privilege_escalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    return {
        "node_selector": system_node_selector(),
        # a Service named "webui" would inject WEBUI_PORT=tcp://... and friends
        "enable_service_links": False,
        "security_context": {"seccomp_profile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "data", "persistent_volume_claim": {"claim_name": claim}}],
    }
