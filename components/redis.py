"""Redis: the seeds' vision-embedding and session cache, the web UI's websocket state, and
optionally LMCache's remote KV store.

One StatefulSet pod runs the official image on the system nodes with the config rendered by
components/render/redis_conf.py (ACL users, AOF, maxmemory) and a redis_exporter sidecar. Its volume
comes from a StorageClass of its own so that its reclaim policy follows `protect`: with
protect the EBS volume outlives the claim, the namespace and `pulumi destroy` (docs/data.md
says how to let it go). A NetworkPolicy admits only the pods that use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import pulumi
import pulumi_kubernetes as k8s

from components.render.network_policies import build_redis_policy
from components.render.redis_conf import (
    ADMIN_PASSWORD_ENTRY,
    APP_USER,
    CONF_FILE,
    EXPORTER_PASSWORD_ENTRY,
    PASSWORD_ENTRY,
    USERNAME_ENTRY,
    RedisConf,
    render_redis_conf,
)
from components.render.redis_pod import (
    COMPONENT,
    DATA_VOLUME,
    HEADLESS_NAME,
    METRICS_PORT_NAME,
    PORT_NAME,
    RedisPod,
    build_pod_spec,
)
from stacks.naming import (
    COMPONENT_LABEL,
    NAME_LABEL,
    REDIS_CONFIG_SECRET,
    REDIS_EXPORTER_PORT,
    REDIS_NAME,
    REDIS_PORT,
    REDIS_SECRET,
    STORAGE_PROVISIONER,
    TYPE_PREFIX,
    common_labels,
)


@dataclass(frozen=True, kw_only=True)
class RedisArgs:
    namespace: pulumi.Input[str]
    image: str
    exporter_image: str
    maxmemory_mib: int
    maxmemory_policy: str
    appendfsync: str
    volume_gib: int
    app_password: pulumi.Input[str]
    exporter_password: pulumi.Input[str]
    admin_password: pulumi.Input[str]
    webui_clients: bool  # admit the web UI's pods
    engine_clients: Sequence[str]  # deployments whose engines use Redis as LMCache's backend
    protect: bool  # keep the StatefulSet and the EBS volume when Pulumi deletes them
    monitoring: bool = True  # admit the monitoring namespace's Prometheus to the exporter

    def pod(self) -> RedisPod:
        return RedisPod(
            image=self.image, exporter_image=self.exporter_image, maxmemory_mib=self.maxmemory_mib
        )


class Redis(pulumi.ComponentResource):
    host: str  # Service DNS name relative to the namespace's search path
    port: int
    client_secret_name: pulumi.Output[str]

    def __init__(
        self, name: str, args: RedisArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(f"{TYPE_PREFIX}:data:Redis", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        kept = pulumi.ResourceOptions(
            parent=self, protect=args.protect, retain_on_delete=args.protect
        )
        labels = common_labels(COMPONENT, REDIS_NAME)
        selector = {NAME_LABEL: REDIS_NAME, COMPONENT_LABEL: COMPONENT}

        conf = pulumi.Output.all(
            args.app_password, args.exporter_password, args.admin_password
        ).apply(
            lambda pw: render_redis_conf(
                RedisConf(
                    app_password=pw[0],
                    exporter_password=pw[1],
                    admin_password=pw[2],
                    maxmemory_mib=args.maxmemory_mib,
                    maxmemory_policy=args.maxmemory_policy,
                    appendfsync=args.appendfsync,
                )
            )
        )
        k8s.core.v1.Secret(
            f"{name}-config",
            metadata={"name": REDIS_CONFIG_SECRET, "namespace": args.namespace, "labels": labels},
            type="Opaque",
            string_data={
                CONF_FILE: conf,
                EXPORTER_PASSWORD_ENTRY: args.exporter_password,
                ADMIN_PASSWORD_ENTRY: args.admin_password,
            },
            opts=child,
        )
        client_secret = k8s.core.v1.Secret(
            f"{name}-auth",
            metadata={"name": REDIS_SECRET, "namespace": args.namespace, "labels": labels},
            type="Opaque",
            string_data={USERNAME_ENTRY: APP_USER, PASSWORD_ENTRY: args.app_password},
            opts=child,
        )
        storage = gp3_storage_class(
            f"{name}-storage",
            pulumi.Output.concat(args.namespace, "-redis-gp3"),
            labels,
            protect=args.protect,
            opts=kept,
        )
        ports: list[k8s.core.v1.ServicePortArgsDict] = [
            {"name": PORT_NAME, "port": REDIS_PORT, "target_port": PORT_NAME}
        ]
        k8s.core.v1.Service(
            f"{name}-headless",
            metadata={"name": HEADLESS_NAME, "namespace": args.namespace, "labels": labels},
            spec={"cluster_ip": "None", "selector": selector, "ports": ports},
            opts=child,
        )
        k8s.core.v1.Service(
            f"{name}-service",
            metadata={"name": REDIS_NAME, "namespace": args.namespace, "labels": labels},
            spec={
                "type": "ClusterIP",
                "selector": selector,
                "ports": [
                    *ports,
                    {
                        "name": METRICS_PORT_NAME,
                        "port": REDIS_EXPORTER_PORT,
                        "target_port": METRICS_PORT_NAME,
                    },
                ],
            },
            opts=child,
        )
        k8s.apps.v1.StatefulSet(
            f"{name}-statefulset",
            metadata={"name": REDIS_NAME, "namespace": args.namespace, "labels": labels},
            spec={
                "service_name": HEADLESS_NAME,
                "replicas": 1,
                "selector": {"match_labels": selector},
                "persistent_volume_claim_retention_policy": {
                    "when_deleted": "Retain" if args.protect else "Delete",
                    "when_scaled": "Retain",
                },
                "template": {
                    "metadata": {
                        "labels": labels,
                        # a new config rolls the pod: Redis reads its file only at start
                        "annotations": {
                            "checksum/config": conf.apply(
                                lambda text: hashlib.sha256(text.encode()).hexdigest()
                            )
                        },
                    },
                    "spec": cast(k8s.core.v1.PodSpecArgsDict, build_pod_spec(args.pod())),
                },
                "volume_claim_templates": [
                    {
                        "metadata": {"name": DATA_VOLUME, "labels": labels},
                        "spec": {
                            "access_modes": ["ReadWriteOnce"],
                            "storage_class_name": storage.metadata.name,
                            "resources": {"requests": {"storage": f"{args.volume_gib}Gi"}},
                        },
                    }
                ],
            },
            opts=kept,
        )
        # Built by the namespace's policy renderer (components/render/network_policies.py), which
        # also writes the policies of Redis's clients; registered here so its URN stays put.
        rendered = build_redis_policy(
            "",  # the namespace is the Output below
            webui_clients=args.webui_clients,
            engine_clients=args.engine_clients,
            monitoring=args.monitoring,
        )
        k8s.networking.v1.NetworkPolicy(
            f"{name}-ingress",
            metadata={
                "name": rendered["metadata"]["name"],
                "namespace": args.namespace,
                "labels": labels,
            },
            spec=rendered["spec"],
            opts=child,
        )

        self.host = REDIS_NAME
        self.port = REDIS_PORT
        self.client_secret_name = client_secret.metadata.name
        self.register_outputs(
            {"host": self.host, "port": self.port, "client_secret_name": self.client_secret_name}
        )


def gp3_storage_class(
    resource_name: str,
    class_name: pulumi.Input[str],
    labels: Mapping[str, str],
    *,
    protect: bool,
    opts: pulumi.ResourceOptions,
) -> k8s.storage.v1.StorageClass:
    """An encrypted gp3 StorageClass of the EBS CSI driver, one per stateful component (Redis,
    the web UI, Prometheus and Grafana) so that its reclaim policy follows `protect`: Retain
    keeps the EBS volume when its claim is deleted."""
    return k8s.storage.v1.StorageClass(
        resource_name,
        metadata={"name": class_name, "labels": dict(labels)},
        provisioner=STORAGE_PROVISIONER,
        parameters={"type": "gp3", "encrypted": "true"},
        reclaim_policy="Retain" if protect else "Delete",
        # Bind where the pod is scheduled: an EBS volume lives in one AZ.
        volume_binding_mode="WaitForFirstConsumer",
        allow_volume_expansion=True,
        opts=opts,
    )
