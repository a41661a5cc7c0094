"""The rendered redis.conf, judged by the real redis-server on loopback, with the pod's readiness
probe (real redis-cli) and exporter sidecar (Debian's redis_exporter) run against it; the
LMCache env.

Each server is a foreground child (`daemonize no`) on 127.0.0.1 and a free port, with its
`dir` under pytest's tmp_path, and is always stopped and waited for (PID 1 here reaps no
orphans, docs/reference/toolchain.md#orphan-reaping). Clients speak RESP over a socket: no Python Redis package.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest

from components.render.redis_conf import (
    LMCACHE_KV_TRANSFER_CONFIG,
    LMCACHE_PASSWORD_ENV,
    acl_hash,
    build_key_scheme,
    build_lmcache_env,
    redis_memory_mib,
    redis_url,
    render_redis_conf,
    session_key,
    vision_key,
)
from stacks.naming import REDIS_PORT, REDIS_SECRET
from tests.support.redis_conf import ADMIN, APP, EXPORTER, conf_for


def test_the_rendered_file_holds_hashes_not_passwords(tmp_path: Path) -> None:
    text = render_redis_conf(conf_for(tmp_path))
    for password in (APP, EXPORTER, ADMIN):
        assert password not in text
        assert "#" + hashlib.sha256(password.encode()).hexdigest() in text
    assert acl_hash("abc") == "#ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("bind", "0.0.0.0\nuser evil on nopass ~* +@all", "bind"),
        ("maxmemory_policy", "allkeys-lru\nuser evil on nopass", "maxmemory_policy"),
        ("appendfsync", "always save", "appendfsync"),
        ("data_dir", "/data\nappendonly no", "data_dir"),
        ("maxmemory_mib", 0, "maxmemory_mib"),
        ("app_password", "", "password"),
        ("port", 70000, "port"),
    ],
)
def test_values_that_would_break_the_file_are_refused(
    tmp_path: Path, field: str, value: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        render_redis_conf(conf_for(tmp_path, **{field: value}))


def test_pod_memory_leaves_room_for_the_rewrite_fork() -> None:
    assert redis_memory_mib(512) == 1024  # 512 * 1.5 + 256
    assert redis_memory_mib(4096) == 6400  # 4096 * 1.5 + 256


def test_the_key_scheme() -> None:
    assert vision_key(b"abc") == (
        "vision:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert session_key("c0ffee") == "session:c0ffee"
    with pytest.raises(ValueError, match="whitespace"):
        session_key("a b")
    scheme = build_key_scheme(86400, 3600)
    assert scheme["vision"]["ttlSeconds"] == 86400
    assert scheme["session"]["ttlSeconds"] == 3600
    assert scheme["vision"]["key"].startswith("vision:")


def test_redis_url_carries_the_app_user() -> None:
    url = urlsplit(redis_url("redis.qwen-vl.svc.cluster.local", 6379, "Abc123"))
    assert (url.scheme, url.username, url.password) == ("redis", "app", "Abc123")
    assert (url.hostname, url.port, url.path) == ("redis.qwen-vl.svc.cluster.local", 6379, "/0")
    with pytest.raises(ValueError, match="alphanumeric"):
        redis_url("h", 1, "p@ss/word")


def test_lmcache_env_reaches_redis_as_the_app_user() -> None:
    env = build_lmcache_env("redis.qwen-vl.svc.cluster.local", REDIS_PORT, REDIS_SECRET)
    names = [e["name"] for e in env]
    # $(VAR) expands only variables defined earlier in the container's env list
    assert names.index(LMCACHE_PASSWORD_ENV) < names.index("LMCACHE_REMOTE_URL")
    by_name = {e["name"]: e for e in env}
    assert by_name[LMCACHE_PASSWORD_ENV]["valueFrom"] == {
        "secretKeyRef": {"name": "redis-auth", "key": "password"}
    }
    url = by_name["LMCACHE_REMOTE_URL"]["value"].replace(f"$({LMCACHE_PASSWORD_ENV})", "Pw1")
    parts = urlsplit(url)
    assert (parts.scheme, parts.username, parts.password) == ("redis", "app", "Pw1")
    assert (parts.hostname, parts.port) == ("redis.qwen-vl.svc.cluster.local", 6379)
    assert by_name["LMCACHE_MAX_LOCAL_CPU_SIZE"]["value"] == "5"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "engine"},
        "spec": {"containers": [{"name": "vllm", "image": "vllm", "env": env}]},
    }
    kubernetes_validate.validate(pod, "1.33.0", strict=True)


def test_lmcache_kv_transfer_config() -> None:
    assert json.loads(LMCACHE_KV_TRANSFER_CONFIG) == {
        "kv_connector": "LMCacheConnectorV1",
        "kv_role": "kv_both",
    }
