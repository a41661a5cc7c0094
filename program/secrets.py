"""Generated credentials of a stack (pulumi-random): Pulumi secrets, never literals.

Created once here and handed to the stages that need them, so the gateway and
the engines agree on the engine key, and the web UI uses the gateway key issued
to it. Only the Hugging Face token comes from config (`hfToken`, a secure value).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pulumi
import pulumi_random as random

from stacks.naming import PASSWORD_LENGTH
from stacks.schema import Settings


@dataclass(frozen=True)
class StackSecrets:
    engine_api_key: pulumi.Output[str]
    client_api_keys: Mapping[str, pulumi.Output[str]]  # gateway key id -> key
    redis_password: pulumi.Output[str]  # the app user's, handed to clients
    redis_exporter_password: pulumi.Output[str]
    redis_admin_password: pulumi.Output[str]
    grafana_admin_password: pulumi.Output[str]
    webui_admin_password: pulumi.Output[str]
    webui_secret_key: pulumi.Output[str]
    hf_token: pulumi.Output[str] | None


def _password(name: str, length: int = PASSWORD_LENGTH) -> pulumi.Output[str]:
    # No special characters: the values end up in headers, URLs and config files.
    return random.RandomPassword(name, length=length, special=False).result


def build_secrets(settings: Settings) -> StackSecrets:
    hf = settings.hf_token
    return StackSecrets(
        engine_api_key=_password("engine-api-key"),
        client_api_keys={k: _password(f"gateway-key-{k}") for k in settings.gateway.api_key_ids},
        redis_password=_password("redis-password"),
        redis_exporter_password=_password("redis-exporter-password"),
        redis_admin_password=_password("redis-admin-password"),
        grafana_admin_password=_password("grafana-admin-password", 24),
        webui_admin_password=_password("webui-admin-password", 24),
        webui_secret_key=_password("webui-secret-key", 48),
        hf_token=hf.value if hf is not None else None,
    )
