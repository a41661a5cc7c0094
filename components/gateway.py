"""The Nginx gateway: the OpenAI-compatible front door of every model deployment.

A Deployment of nginx (config rendered by components/render/nginx_conf.py, cluster upstream mode)
with an nginx-prometheus-exporter sidecar, on the system nodes and spread over the AZs; a
ConfigMap with the config and a Secret with the includes that carry keys (the client key map
and the engine's Authorization header), both checksummed into the pod template so any change
rolls the pods; a PodDisruptionBudget; a ClusterIP Service for in-cluster clients and a
LoadBalancer Service that the AWS cloud controller turns into an NLB.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

import pulumi
import pulumi_kubernetes as k8s

from components.render.gateway_pod import (
    COMPONENT,
    CONFIG_CHECKSUM,
    CONFIG_MAP_NAME,
    HTTP_PORT_NAME,
    LB_SERVICE_NAME,
    SECRETS_CHECKSUM,
    GatewayPod,
    build_nlb_annotations,
    build_pod_spec,
    config_files,
    pod_labels,
    sha256,
)
from components.render.nginx_conf import (
    API_KEYS_FILE,
    ENGINE_AUTH_FILE,
    NginxConfArgs,
    render_api_keys_map,
    render_engine_auth,
)
from stacks.naming import (
    COMPONENT_LABEL,
    GATEWAY_KEYS_SECRET,
    GATEWAY_NAME,
    GATEWAY_SERVICE_PORT,
    GATEWAY_TLS_PORT,
    NAME_LABEL,
    TYPE_PREFIX,
    common_labels,
    gateway_internal_url,
)


@dataclass(frozen=True, kw_only=True)
class GatewayArgs:
    namespace: pulumi.Input[str]
    conf: NginxConfArgs  # cluster upstream mode, default pod paths
    replicas: int
    image: str  # nginx >= 1.27.3 (upstream `resolve`)
    exporter_image: str
    quota_image: str | None
    redis_address: str  # host:port
    client_api_keys: Mapping[str, pulumi.Input[str]]  # key id -> key (Pulumi secrets)
    engine_api_key: pulumi.Input[str]
    scheme: Literal["internal", "internet-facing"]
    tls_certificate_arn: str | None = None
    load_balancer_tags: Mapping[str, str] = field(default_factory=dict)
    # What must exist before the pods can be scheduled (the system node group).
    depends_on: Sequence[pulumi.Resource] = ()

    def pod(self) -> GatewayPod:
        return GatewayPod(
            conf=self.conf,
            image=self.image,
            exporter_image=self.exporter_image,
            replicas=self.replicas,
            quota_image=self.quota_image,
            redis_address=self.redis_address,
        )


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
        files = config_files(args.conf)
        self.config_checksum = sha256("".join(files.values()))

        k8s.core.v1.ConfigMap(
            f"{name}-config",
            metadata={"name": CONFIG_MAP_NAME, "namespace": args.namespace, "labels": labels},
            data=files,
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
                        "labels": {**labels, **pod_labels(args.pod())},
                        "annotations": {
                            # nginx reads its files only at start: a change must roll the pods
                            CONFIG_CHECKSUM: self.config_checksum,
                            SECRETS_CHECKSUM: secrets_checksum,
                        },
                    },
                    "spec": cast(k8s.core.v1.PodSpecArgsDict, build_pod_spec(args.pod(), selector)),
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


def _hostname(status: k8s.core.v1.outputs.ServiceStatus | None) -> str | None:
    """The NLB's DNS name once the cloud controller has published it."""
    ingress = status.load_balancer.ingress if status and status.load_balancer else None
    return ingress[0].hostname if ingress else None
