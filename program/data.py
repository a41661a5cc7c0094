"""Data and web UI stages: Redis (cache, web UI state, LMCache backend) and Open WebUI.

Redis's connection details and key scheme become stack outputs for application clients
(the app password as a secret output); the web UI gets its own gateway key and reaches
Redis as the same `app` user. docs/data.md is the user-facing side of this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pulumi

from components.redis import Redis, RedisArgs
from components.render.network_policies import redis_engine_clients
from components.render.redis_conf import APP_USER, build_key_scheme, redis_url
from components.webui import WebUi, WebUiArgs
from program.platform import Platform, stack_tags
from program.secrets import StackSecrets
from stacks.naming import (
    REDIS_NAME,
    REDIS_PORT,
    REDIS_SECRET,
    WEBUI_API_KEY_ID,
    WEBUI_NAME,
    WEBUI_PORT,
    gateway_internal_url,
    service_host,
)
from stacks.schema import Settings


@dataclass(frozen=True)
class DataOut:
    """How clients reach Redis; `password` is the app user's, a secret Output."""

    host: str  # fully qualified Service name
    port: int
    username: str
    password: pulumi.Output[str]
    client_secret_name: str  # Secret with `username` and `password` for pods to reference
    key_scheme: Mapping[str, Any]
    component: pulumi.Resource  # pods that read client_secret_name wait for it

    def outputs(self) -> dict[str, Any]:
        return {
            "redis_host": self.host,
            "redis_port": self.port,
            "redis_username": self.username,
            "redis_password": self.password,
            "redis_client_secret": self.client_secret_name,
            "redis_key_scheme": dict(self.key_scheme),
        }


@dataclass(frozen=True)
class WebUiOut:
    internal_url: str
    load_balancer_host: pulumi.Output[str | None]
    admin_email: str
    admin_password: pulumi.Output[str]

    def outputs(self) -> dict[str, Any]:
        return {
            "webui_internal_url": self.internal_url,
            "webui_url": self.load_balancer_host.apply(lambda h: f"http://{h}" if h else None),
            "webui_admin_email": self.admin_email,
            "webui_admin_password": self.admin_password,
        }


def build_data(settings: Settings, platform: Platform, secrets: StackSecrets) -> DataOut | None:
    r = settings.redis
    if not r.enabled:
        return None
    args = RedisArgs(
        namespace=platform.namespace,
        image=r.image,
        exporter_image=r.exporter_image,
        maxmemory_mib=r.maxmemory_mib,
        maxmemory_policy=r.maxmemory_policy,
        appendfsync=r.appendfsync,
        volume_gib=r.volume_gib,
        app_password=secrets.redis_password,
        exporter_password=secrets.redis_exporter_password,
        admin_password=secrets.redis_admin_password,
        webui_clients=settings.webui.enabled,
        engine_clients=redis_engine_clients(settings),
        monitoring=settings.monitoring.enabled,
        protect=settings.protect,
    )
    redis = Redis(REDIS_NAME, args, opts=platform.opts(depends_on=list(platform.node_groups)))
    return DataOut(
        host=service_host(REDIS_NAME, settings.serving.namespace),
        port=REDIS_PORT,
        username=APP_USER,
        password=pulumi.Output.secret(secrets.redis_password),
        client_secret_name=REDIS_SECRET,
        key_scheme=build_key_scheme(r.vision_cache_ttl_seconds, r.session_ttl_seconds),
        component=redis,
    )


def data_outputs(data: DataOut | None) -> dict[str, Any]:
    return data.outputs() if data is not None else {}


def build_webui(
    settings: Settings, platform: Platform, secrets: StackSecrets, data: DataOut | None
) -> WebUiOut | None:
    w = settings.webui
    # The rules make webui.enabled require redis.enabled and the "webui" gateway key.
    if not w.enabled or data is None:
        return None
    namespace = settings.serving.namespace
    args = WebUiArgs(
        namespace=platform.namespace,
        image=w.image,
        replicas=w.replicas,
        volume_gib=w.volume_gib,
        exposure=w.exposure,
        openai_base_url=gateway_internal_url(namespace) + "/v1",
        api_key=secrets.client_api_keys[WEBUI_API_KEY_ID],
        admin_email=w.admin_email,
        admin_password=secrets.webui_admin_password,
        secret_key=secrets.webui_secret_key,
        redis_url=pulumi.Output.secret(
            data.password.apply(lambda pw: redis_url(data.host, data.port, pw))
        ),
        load_balancer_tags=stack_tags(settings),
        protect=settings.protect,
    )
    webui = WebUi(WEBUI_NAME, args, opts=platform.opts(depends_on=list(platform.node_groups)))
    return WebUiOut(
        internal_url=f"http://{service_host(WEBUI_NAME, namespace)}:{WEBUI_PORT}",
        load_balancer_host=webui.load_balancer_host,
        admin_email=w.admin_email,
        admin_password=pulumi.Output.secret(secrets.webui_admin_password),
    )


def webui_outputs(webui: WebUiOut | None) -> dict[str, Any]:
    return webui.outputs() if webui is not None else {}
