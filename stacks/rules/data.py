"""Rules of redis and webui."""

from __future__ import annotations

import math
from collections.abc import Iterator

from stacks.naming import (
    WEBUI_API_KEY_ID,
)
from stacks.parse import Problem
from stacks.rules.common import positive
from stacks.schema import Settings
from stacks.vllm_flags import parse_version

# Redis's AOF rewrite writes the new file next to the old one, so the volume holds two copies.
AOF_VOLUME_FACTOR = 2


# Open WebUI reads WEBUI_ADMIN_EMAIL/WEBUI_ADMIN_PASSWORD from 0.7.0 on (CHANGELOG, #17654).
WEBUI_ADMIN_ENV_SINCE = (0, 7, 0)


def data_rules(s: Settings) -> Iterator[Problem]:
    """Redis: sizes that fit, and TTLs that expire."""
    r = s.redis
    if not r.enabled:
        return
    yield from positive("redis.maxmemoryMib", r.maxmemory_mib)
    yield from positive("redis.visionCacheTtlSeconds", r.vision_cache_ttl_seconds)
    yield from positive("redis.sessionTtlSeconds", r.session_ttl_seconds)
    need_gib = math.ceil(AOF_VOLUME_FACTOR * r.maxmemory_mib / 1024)
    if r.volume_gib < need_gib:
        yield Problem(
            "redis.volumeGib",
            f"must hold two AOF copies of maxmemoryMib="
            f"{r.maxmemory_mib} (a rewrite writes the new file beside the old one); "
            f"use at least {need_gib}",
            r.volume_gib,
        )


def webui_rules(s: Settings) -> Iterator[Problem]:
    w = s.webui
    if not w.enabled:
        return
    if WEBUI_API_KEY_ID not in s.gateway.api_key_ids:
        yield Problem(
            "gateway.apiKeyIds",
            f"must include {WEBUI_API_KEY_ID!r} while "
            "webui.enabled is true: the web UI calls the gateway with a key of its "
            "own (add it, or set webui.enabled: false)",
            list(s.gateway.api_key_ids),
        )
    if not s.redis.enabled:
        yield Problem(
            "webui.enabled",
            "needs redis.enabled: true (the web UI keeps its "
            "websocket state in Redis); enable Redis or disable the web UI",
            True,
        )
    if w.replicas != 1:
        yield Problem(
            "webui.replicas",
            "must be 1: Open WebUI keeps users and chats in SQLite "
            "on a ReadWriteOnce volume that one pod mounts; more replicas would need "
            "an external database and shared storage, which this stack does not run",
            w.replicas,
        )
    yield from positive("webui.volumeGib", w.volume_gib)


def webui_warnings(s: Settings) -> list[Problem]:
    """An image that ignores the admin account variables starts with no account to sign in."""
    if not s.webui.enabled:
        return []
    tag = s.webui.image.split("@", 1)[0].rsplit("/", 1)[-1].partition(":")[2]
    version = parse_version(tag.removeprefix("v"))
    if version is None or version >= WEBUI_ADMIN_ENV_SINCE:
        return []
    since = ".".join(map(str, WEBUI_ADMIN_ENV_SINCE))
    return [
        Problem(
            "webui.image",
            f"Open WebUI before {since} ignores WEBUI_ADMIN_EMAIL/"
            "WEBUI_ADMIN_PASSWORD, and signup is off: the web UI would start with no "
            f"account anyone can sign in with; pin {since} or later",
            s.webui.image,
        )
    ]
