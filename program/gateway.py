"""Gateway stage: the Nginx gateway in front of every deployment's leader Service.

Its upstreams are the engines stage's headless leader Services, named by the same
stacks/naming.py functions; the client API keys (one per gateway.apiKeyIds entry) and
the engine key come from program/secrets.py. docs/gateway.md is the user-facing side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi

from components.gateway import Gateway, GatewayArgs
from components.render.nginx_conf import build_nginx_conf_args
from program.platform import Platform, stack_tags
from program.secrets import StackSecrets
from stacks.naming import GATEWAY_NAME, REDIS_NAME, REDIS_PORT, gateway_internal_url, service_host
from stacks.schema import Settings


@dataclass(frozen=True)
class GatewayOut:
    internal_url: str  # for in-cluster clients (the web UI, load tests)
    load_balancer_host: pulumi.Output[str | None]  # the NLB's DNS name
    url: pulumi.Output[str | None]  # what clients outside the cluster use as base URL
    api_keys: pulumi.Output[dict[str, str]]  # key id -> key, a secret
    component: Gateway

    def outputs(self) -> dict[str, Any]:
        return {
            "gateway_internal_url": self.internal_url,
            "gateway_load_balancer_host": self.load_balancer_host,
            "gateway_url": self.url,
            "gateway_api_keys": self.api_keys,
        }


def build_gateway(settings: Settings, platform: Platform, secrets: StackSecrets) -> GatewayOut:
    g = settings.gateway
    component = Gateway(
        GATEWAY_NAME,
        GatewayArgs(
            namespace=platform.namespace,
            conf=build_nginx_conf_args(settings),
            replicas=g.replicas,
            image=g.image,
            exporter_image=g.exporter_image,
            quota_image=g.quota_image,
            redis_address=f"{service_host(REDIS_NAME, settings.serving.namespace)}:{REDIS_PORT}",
            client_api_keys=secrets.client_api_keys,
            engine_api_key=secrets.engine_api_key,
            scheme=g.scheme,
            tls_certificate_arn=g.tls_certificate_arn,
            load_balancer_tags=stack_tags(settings),
            depends_on=platform.node_groups,
        ),
        opts=platform.opts(),
    )
    scheme = "https" if g.tls_certificate_arn else "http"
    keys = pulumi.Output.all(**secrets.client_api_keys).apply(dict)
    return GatewayOut(
        internal_url=gateway_internal_url(settings.serving.namespace),
        load_balancer_host=component.load_balancer_host,
        url=component.load_balancer_host.apply(lambda h: f"{scheme}://{h}" if h else None),
        api_keys=pulumi.Output.secret(keys),
        component=component,
    )
