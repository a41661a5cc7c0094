"""Helpers shared by the redis_conf tests of several layers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from components.render.redis_conf import (
    RedisConf,
)
from tests.support.local import free_port

APP, EXPORTER, ADMIN = "app-pw-7f3a", "exporter-pw-91c2", "admin-pw-5d0e"


MAXMEMORY_MIB = 8


def conf_for(workdir: Path, **overrides: Any) -> RedisConf:
    base = RedisConf(
        app_password=APP,
        exporter_password=EXPORTER,
        admin_password=ADMIN,
        maxmemory_mib=MAXMEMORY_MIB,
        maxmemory_policy="allkeys-lfu",
        appendfsync="everysec",
        bind="127.0.0.1",
        port=free_port(),
        data_dir=str(workdir),
    )
    return replace(base, **overrides)
