"""Redis's configuration, its users, and how clients reach it: pure functions, no Pulumi.

Decisions (docs/data.md explains them to operators):
- The ACL users live in redis.conf as `user` lines carrying SHA-256 hashes (`#<hex>`),
  never a plaintext password; the file still goes into a Secret, not a ConfigMap, because a
  hash of a password is a credential too. No `requirepass` (it would only set the default
  user's password, which is exactly the user we switch off).
- `default` is off: a connection that has not AUTHed gets NOAUTH for every command.
- `app` (StackSecrets.redis_password) is for every application client: the web UI, LMCache
  in the engines, the seeds' vision and session caches. It may run everything except the
  @dangerous category (FLUSHALL, FLUSHDB, CONFIG, DEBUG, KEYS, SHUTDOWN, MONITOR, ACL,
  SAVE/BGSAVE, REPLICAOF, MIGRATE, RESTORE, SWAPDB, CLIENT KILL/LIST, ...): one buggy client
  cannot wipe or reconfigure the cache the others share.
- `exporter` runs only what redis_exporter issues on a scrape (exporter/exporter.go:
  CLIENT SETNAME, CONFIG GET *, INFO ALL, LATENCY, SLOWLOG, CLUSTER INFO) and reads no keys.
- `admin` is the break-glass user for operators (`kubectl exec ... redis-cli --user admin`).
- Persistence is AOF only (`appendonly yes`, `save ""`): the AOF already survives restarts,
  and RDB snapshots on top would add a second fork and a second copy on the volume.
  `aof-use-rdb-preamble` keeps rewrites compact.
- It is a cache: `maxmemory` with an eviction policy from settings, lazy freeing so that
  evicting a multi-megabyte LMCache chunk does not stall the event loop.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from stacks.naming import REDIS_PORT
from stacks.pod_sizing import LMCACHE_LOCAL_CPU_GIB

APP_USER: Final = "app"
EXPORTER_USER: Final = "exporter"
ADMIN_USER: Final = "admin"

DATA_DIR: Final = "/data"
CONF_FILE: Final = "redis.conf"

# Entries of the client Secret (naming.REDIS_SECRET) that pods of the web UI and the
# engines reference; the server's own Secret holds the config and the other passwords.
USERNAME_ENTRY: Final = "username"
PASSWORD_ENTRY: Final = "password"
EXPORTER_PASSWORD_ENTRY: Final = "exporter-password"
ADMIN_PASSWORD_ENTRY: Final = "admin-password"

# Settings already restrict these to Redis's words; the renderer only keeps each value to one
# token on its line, and redis-server itself judges the words (the tests start it).
_WORD = re.compile(r"^[a-z-]+$")
_BIND = re.compile(r"^[0-9a-fA-F.:*\- ]+$")
_DIR = re.compile(r"^/[A-Za-z0-9._/\-]*$")

# What redis_exporter runs per scrape with its default flags, nothing else (no key reads:
# --check-keys and --count-keys stay off).
EXPORTER_COMMANDS: Final = (
    "+ping",
    "+info",
    "+config|get",
    "+client|setname",
    "+latency|latest",
    "+latency|histogram",
    "+slowlog|get",
    "+slowlog|len",
    "+cluster|info",
)

MIB: Final = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class RedisConf:
    """Everything redis.conf is rendered from; passwords arrive in plaintext and leave hashed."""

    app_password: str
    exporter_password: str
    admin_password: str
    maxmemory_mib: int
    maxmemory_policy: str
    appendfsync: str
    bind: str = "0.0.0.0"
    port: int = REDIS_PORT
    data_dir: str = DATA_DIR


def acl_hash(password: str) -> str:
    """Redis's stored form of a password: `#` and the SHA-256 hex digest."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def _check(conf: RedisConf) -> None:
    """Reject values that would break or smuggle lines into the file."""
    if not all((conf.app_password, conf.exporter_password, conf.admin_password)):
        raise ValueError("every Redis user needs a non-empty password")
    if conf.maxmemory_mib <= 0:
        raise ValueError(f"maxmemory_mib must be positive, got {conf.maxmemory_mib}")
    for field, value in (
        ("maxmemory_policy", conf.maxmemory_policy),
        ("appendfsync", conf.appendfsync),
    ):
        if not _WORD.match(value):
            raise ValueError(f"{field} must be one lowercase word, got {value!r}")
    if not 0 < conf.port < 65536:  # noqa: PLR2004 (the TCP port range)
        raise ValueError(f"port {conf.port} is out of range")
    if not _BIND.match(conf.bind):
        raise ValueError(f"bind must be addresses separated by spaces, got {conf.bind!r}")
    if not _DIR.match(conf.data_dir):
        raise ValueError(f"data_dir must be an absolute plain path, got {conf.data_dir!r}")


def render_redis_conf(conf: RedisConf) -> str:
    """redis.conf for redis-server 7.0 and later, users and ACLs included."""
    _check(conf)
    exporter = " ".join(EXPORTER_COMMANDS)
    return f"""# Rendered by components/render/redis_conf.py. Started as `redis-server <this file>`.
bind {conf.bind}
port {conf.port}
protected-mode yes
daemonize no
supervised no
logfile ""
loglevel notice
tcp-keepalive 60
dir {conf.data_dir}

# Persistence: the append-only file only, no RDB snapshots.
appendonly yes
appendfsync {conf.appendfsync}
aof-use-rdb-preamble yes
save ""

# A cache: evict at maxmemory instead of refusing writes; free big values off the main thread.
maxmemory {conf.maxmemory_mib * MIB}
maxmemory-policy {conf.maxmemory_policy}
lazyfree-lazy-eviction yes
lazyfree-lazy-expire yes

enable-debug-command no
enable-module-command no
enable-protected-configs no

user default off resetpass resetkeys resetchannels -@all
user {APP_USER} on {acl_hash(conf.app_password)} ~* &* +@all -@dangerous
user {EXPORTER_USER} on {acl_hash(conf.exporter_password)} resetkeys resetchannels -@all {exporter}
user {ADMIN_USER} on {acl_hash(conf.admin_password)} ~* &* +@all
"""


def redis_memory_mib(maxmemory_mib: int) -> int:
    """Pod memory for a maxmemory: half again for fragmentation and the copy-on-write pages
    of an AOF rewrite's fork, plus a fixed 256 MiB for the server and its buffers."""
    return maxmemory_mib * 3 // 2 + 256


def redis_url(host: str, port: int, password: str, username: str = APP_USER, db: int = 0) -> str:
    """A redis:// URL for redis-py and Open WebUI (the generated passwords are alphanumeric,
    so nothing needs escaping; anything else is refused rather than silently mangled)."""
    if not re.fullmatch(r"[A-Za-z0-9]+", password):
        raise ValueError("expected an alphanumeric password (RandomPassword special=False)")
    return f"redis://{username}:{password}@{host}:{port}/{db}"


# ---- Application key scheme (docs/data.md) ------------------------------------------------

VISION_PREFIX: Final = "vision:"
SESSION_PREFIX: Final = "session:"


def vision_key(image: bytes) -> str:
    """Key of a cached vision embedding / preprocessed image: its bytes' SHA-256."""
    return VISION_PREFIX + hashlib.sha256(image).hexdigest()


def session_key(session_id: str) -> str:
    if not session_id or any(c.isspace() for c in session_id):
        raise ValueError(f"session ids are non-empty and contain no whitespace: {session_id!r}")
    return SESSION_PREFIX + session_id


def build_key_scheme(vision_ttl_seconds: int, session_ttl_seconds: int) -> dict[str, Any]:
    """The key scheme application clients follow, exported as a stack output."""
    return {
        "vision": {
            "key": VISION_PREFIX + "<sha256 hex of the image bytes>",
            "ttlSeconds": vision_ttl_seconds,
            "value": "the vision encoder's output (or preprocessed pixels) for that image",
        },
        "session": {
            "key": SESSION_PREFIX + "<session id, e.g. the X-Session-Id header>",
            "ttlSeconds": session_ttl_seconds,
            "value": "the multi-turn conversation state of that session",
        },
    }


# ---- LMCache remote KV backend (engines with kvOffloadRedis) -----------------------------

# vLLM's --kv-transfer-config for LMCache (vllm/config/kv_transfer.py): the engine both
# stores its KV blocks and loads them back.
LMCACHE_KV_TRANSFER_CONFIG: Final = json.dumps(
    {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}, separators=(",", ":")
)
LMCACHE_PASSWORD_ENV: Final = "LMCACHE_REDIS_PASSWORD"


def build_lmcache_env(
    redis_host: str, port: int, secret_name: str, *, local_cpu_gib: float = LMCACHE_LOCAL_CPU_GIB
) -> list[dict[str, Any]]:
    """LMCACHE_* environment of an engine container, in Kubernetes API form (camelCase).

    LMCache reads its config from LMCACHE_<KEY> variables (lmcache/v1/config.py); its Redis
    connector opens `remote_url` with redis-py's from_url, so the app user's credentials go
    in the URL. The password comes from the Secret and enters the URL through Kubernetes'
    $(VAR) expansion, which only sees variables defined earlier in the list: order matters.
    `local_cpu_gib` is pinned host memory LMCache stages chunks in; count it in the pod.
    """
    url = f"redis://{APP_USER}:$({LMCACHE_PASSWORD_ENV})@{redis_host}:{port}"
    password: Mapping[str, Any] = {"secretKeyRef": {"name": secret_name, "key": PASSWORD_ENTRY}}
    return [
        {"name": LMCACHE_PASSWORD_ENV, "valueFrom": dict(password)},
        {"name": "LMCACHE_REMOTE_URL", "value": url},
        {"name": "LMCACHE_REMOTE_SERDE", "value": "naive"},
        {"name": "LMCACHE_CHUNK_SIZE", "value": "256"},
        {"name": "LMCACHE_LOCAL_CPU", "value": "False"},
        {"name": "LMCACHE_MAX_LOCAL_CPU_SIZE", "value": f"{local_cpu_gib:g}"},
    ]
