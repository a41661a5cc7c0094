"""The Redis pod: redis-server with the rendered config and the redis_exporter sidecar (pure:
plain dicts in Pulumi's input form), shared by components/redis.py and the rehearsal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from components.render.redis_conf import (
    CONF_FILE,
    DATA_DIR,
    EXPORTER_PASSWORD_ENTRY,
    EXPORTER_USER,
    redis_memory_mib,
)
from stacks.naming import (
    REDIS_CONFIG_SECRET,
    REDIS_EXPORTER_PORT,
    REDIS_NAME,
    REDIS_PORT,
    system_node_selector,
)


@dataclass(frozen=True, kw_only=True)
class RedisPod:
    image: str
    exporter_image: str
    maxmemory_mib: int


COMPONENT = "cache"


CONF_DIR = "/usr/local/etc/redis"


# The official image's redis user; fsGroup makes the volume and the config readable to it.
REDIS_UID = 999


HEADLESS_NAME = f"{REDIS_NAME}-headless"


PORT_NAME = "redis"


METRICS_PORT_NAME = "metrics"


DATA_VOLUME = "data"


CONF_VOLUME = "config"


def build_pod_spec(args: RedisPod) -> dict[str, Any]:
    memory = f"{redis_memory_mib(args.maxmemory_mib)}Mi"
    hardened: dict[str, Any] = {
        "allow_privilege_escalation": False,
        "read_only_root_filesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    exporter_password: dict[str, Any] = {
        "secret_key_ref": {"name": REDIS_CONFIG_SECRET, "key": EXPORTER_PASSWORD_ENTRY}
    }
    # redis-cli exits 0 even on NOAUTH or LOADING, so the probe compares the reply itself.
    ping = (
        f'test "$(redis-cli -p {REDIS_PORT} --user {EXPORTER_USER} --no-auth-warning ping)" = PONG'
    )
    redis: dict[str, Any] = {
        "name": "redis",
        "image": args.image,
        # args, not command: the image's entrypoint still sets its umask before exec
        "args": ["redis-server", f"{CONF_DIR}/{CONF_FILE}"],
        "ports": [{"name": PORT_NAME, "container_port": REDIS_PORT}],
        # redis-cli reads the password from REDISCLI_AUTH: the probe never shows it in ps
        "env": [{"name": "REDISCLI_AUTH", "value_from": exporter_password}],
        "volume_mounts": [
            {"name": DATA_VOLUME, "mount_path": DATA_DIR},
            {"name": CONF_VOLUME, "mount_path": CONF_DIR, "read_only": True},
        ],
        "resources": {"requests": {"cpu": "250m", "memory": memory}, "limits": {"memory": memory}},
        # TCP for liveness: Redis listens (and answers LOADING) while it replays a large AOF
        "liveness_probe": {
            "tcp_socket": {"port": PORT_NAME},
            "period_seconds": 20,
            "failure_threshold": 6,
        },
        "readiness_probe": {
            "exec_": {"command": ["sh", "-c", ping]},
            "period_seconds": 10,
            "timeout_seconds": 5,
        },
        "security_context": hardened,
    }
    exporter: dict[str, Any] = {
        "name": "exporter",
        "image": args.exporter_image,
        "env": [
            {"name": "REDIS_ADDR", "value": f"redis://127.0.0.1:{REDIS_PORT}"},
            {"name": "REDIS_USER", "value": EXPORTER_USER},
            {"name": "REDIS_PASSWORD", "value_from": exporter_password},
            {"name": "REDIS_EXPORTER_WEB_LISTEN_ADDRESS", "value": f":{REDIS_EXPORTER_PORT}"},
        ],
        "ports": [{"name": METRICS_PORT_NAME, "container_port": REDIS_EXPORTER_PORT}],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
        "liveness_probe": {"http_get": {"path": "/health", "port": METRICS_PORT_NAME}},
        "security_context": hardened,
    }
    return {
        "node_selector": system_node_selector(),
        # a Service named "redis" would inject REDIS_PORT=tcp://... into every pod
        "enable_service_links": False,
        "security_context": {
            "run_as_user": REDIS_UID,
            "run_as_group": REDIS_UID,
            "fs_group": REDIS_UID,
            "run_as_non_root": True,
            "fs_group_change_policy": "OnRootMismatch",
            "seccomp_profile": {"type": "RuntimeDefault"},
        },
        "termination_grace_period_seconds": 30,
        "containers": [redis, exporter],
        "volumes": [
            {
                "name": CONF_VOLUME,
                "secret": {"secret_name": REDIS_CONFIG_SECRET, "default_mode": 0o440},
            }
        ],
    }
