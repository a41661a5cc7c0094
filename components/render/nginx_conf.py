"""The gateway's nginx.conf, rendered from plain data: the cluster and the rehearsal run this text.

One renderer, two upstream modes (the UPSTREAM_MODES table, the only lines that differ):
`cluster` reaches each deployment's leader pods through their headless Service and
re-resolves it while running (`server ... resolve`, open-source nginx >= 1.27.3), so a
restarted or added leader is picked up without a reload; `static` lists host:port servers,
for the offline rehearsal and the loopback tests, and runs on bookworm's nginx 1.22.

Secrets never appear in this text: the client API-key map and the engine's Authorization
header are `include`d from files of a Kubernetes Secret (render_api_keys_map,
render_engine_auth), so the ConfigMap and its checksum carry no key.

Facts behind the choices: docs/reference/nginx.md (resolve, keepalive, buffering, body size,
retries), docs/reference/vllm.md#open-paths (which vLLM paths are open) and #env-vars (uvicorn's
5 s keep-alive), docs/reference/peers.md#proxy-streaming (what proxies get wrong).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Literal

from components.render.vision_flags import disaggregated
from stacks.naming import (
    BLOCKED_PATHS,
    GATEWAY_METRICS_PORT,
    GATEWAY_PORT,
    GATEWAY_QUOTA_PORT,
    GATEWAY_STATUS_PORT,
    HEADER_NAME,
    KEY_ID,
    VLLM_PORT,
    encoder_name,
    leader_address,
    leader_service_name,
    service_host,
)

if TYPE_CHECKING:
    from stacks.schema import DeploymentSettings, Settings, VisionSettings

UpstreamMode = Literal["cluster", "static"]
LoadBalancing = Literal["leastConn", "sessionAffinity"]


# The gateway pod mounts the ConfigMap here; file names inside the mounted directories.
CONF_DIR: Final = "/etc/nginx/gateway"
CONF_FILE: Final = "nginx.conf"
API_KEYS_FILE: Final = "api-keys.map"
ENGINE_AUTH_FILE: Final = "engine-auth.conf"
RESOLVER_FILE: Final = "resolver.conf"
# The routing tier (njs): the module, and the data it routes by (rendered per stack).
ROUTER_FILE: Final = "router.js"
ROUTES_FILE: Final = "routes.js"
ROUTER_SOURCE: Final = Path(__file__).with_name("gateway_router.js")
QUOTA_FILE: Final = "quota.py"
QUOTA_SOURCE: Final = Path(__file__).with_name("gateway_quota.py")  # the quota sidecar
# Where Debian's and the official image's packages put the njs module.
JS_MODULE: Final = "/usr/lib/nginx/modules/ngx_http_js_module.so"
METRICS_PATH: Final = "/metrics"
QUOTA_PATH: Final = "/_quota"
PLACEMENT_PATH: Final = "/_placement"  # the router's shared session placement (the sidecar)
ENCODER_PATH: Final = "/_encoder"  # + /<deployment>/v1/...: the router's encoder pre-step
# Sessions idle longer than this lose their engine; recounting keeps the per-engine
# session counts true as they expire.
SESSION_RECOUNT_SECONDS: Final = 10
# The router probes each engine's /health this often (affinity only): a gone or unready group
# takes no new session. Shorter than the readiness probe's period would be noise.
HEALTH_PROBE_SECONDS: Final = 2
HEALTH_PROBE_TIMEOUT_SECONDS: Final = 1

HEALTH_PATH: Final = "/healthz"
STATUS_PATH: Final = "/stub_status"

# vLLM's uvicorn closes idle connections after 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE); nginx must
# drop them first, or it reuses a connection the engine is closing and the POST fails.
UPSTREAM_KEEPALIVE_TIMEOUT_SECONDS: Final = 4
# CoreDNS answers for Services with a 5 s TTL; re-resolve as often. IPv4 answers only: the
# cluster's Services and pods are IPv4. The gateway pod's start script fills in {address}.
RESOLVER_VALID_SECONDS: Final = 5
RESOLVER_TEMPLATE: Final = "resolver {address} valid=" + str(RESOLVER_VALID_SECONDS) + "s ipv6=off;"
# In-cluster connects either succeed in milliseconds or the pod is gone: fail over fast.
CONNECT_TIMEOUT_SECONDS: Final = 5
NEXT_UPSTREAM_TRIES: Final = 3
NEXT_UPSTREAM_TIMEOUT_SECONDS: Final = 20
MAX_FAILS: Final = 2
FAIL_TIMEOUT_SECONDS: Final = 10

# Seed-era paths: an alias that still works, and an API vLLM 0.33 no longer serves.
CHAT_ALIAS: Final = "/chat/completions"
CHAT_PATH: Final = "/v1/chat/completions"
REMOVED_GENERATE: Final = "/generate"

# Characters a key may contain inside a double-quoted nginx string (RandomPassword: [A-Za-z0-9]).
_KEY_VALUE: Final = re.compile(r"^[A-Za-z0-9._~+/=-]{8,}$")

# THE substitution table: what differs between the cluster and the static config. Each
# upstream's `server` line, and whether the resolver include (written by the gateway pod at
# start from its /etc/resolv.conf, i.e. kube-dns) is present. Addresses come from
# NginxConfArgs: cluster = "<leader Service>.<namespace>.svc.cluster.local:8000" per
# deployment; static = the host:port list given.
UPSTREAM_MODES: Final[Mapping[UpstreamMode, Mapping[str, str | None]]] = MappingProxyType(
    {
        "cluster": MappingProxyType(
            {
                "server": "server {address} resolve {health};",
                "resolver": "include {runtime_dir}/" + RESOLVER_FILE + ";",
            }
        ),
        "static": MappingProxyType(
            {
                "server": "server {address} {health};",
                "resolver": None,
            }
        ),
    }
)


@dataclass(frozen=True, kw_only=True)
class NginxPaths:
    """Where nginx finds its includes and writes its state (defaults: the gateway pod's mounts)."""

    secrets_dir: str = "/etc/nginx/gateway-secrets"  # Secret volume: API keys, engine auth
    conf_dir: str = CONF_DIR  # ConfigMap volume: router.js and routes.js (js_path)
    runtime_dir: str = "/run/gateway"  # emptyDir: pid, spooled bodies, resolver.conf
    access_log: str = "/dev/stdout"


@dataclass(frozen=True, kw_only=True)
class Backend:
    """One upstream group: the leader pods of a deployment."""

    name: str  # deployment name
    addresses: tuple[str, ...]  # host:port; cluster mode: the leader Service
    # One per group in cluster mode (the leader pod's own DNS name), for session affinity;
    # in static mode the addresses themselves.
    engine_addresses: tuple[str, ...] = ()
    models: tuple[str, ...] = ()  # served name, then aliases: what clients send as `model`
    model_id: str = ""  # the Hugging Face id (GET /v1/models `root`)
    priority: bool = False  # the engines run --scheduling-policy priority
    max_images: int | None = None  # --limit-mm-per-prompt image
    encoder_mode: bool = False  # vision.mode is disaggregated (issue 17)
    encoder_addresses: tuple[str, ...] = ()  # host:port of that tier
    vision: VisionSettings | None = None  # the encoder step's timeout and retries

    @property
    def encoder(self) -> bool:
        """An encoder pre-step runs: the tier is wanted and has addresses."""
        return self.encoder_mode and bool(self.encoder_addresses)

    @property
    def encoder_upstream(self) -> str:
        return f"encoder-{self.name}"

    @property
    def upstream(self) -> str:
        return f"engine-{self.name}"

    @property
    def engines(self) -> tuple[str, ...]:
        """One upstream per engine (a dot cannot occur in a deployment name: no clash)."""
        return tuple(f"{self.upstream}.{i}" for i in range(len(self.engine_addresses)))


@dataclass(frozen=True, kw_only=True)
class KeyPolicy:
    """What the gateway applies to one API key id."""

    priority_class: str
    requests_per_minute: int | None = None


@dataclass(frozen=True, kw_only=True)
class NginxConfArgs:
    """Everything the config depends on, as plain data (build_nginx_conf_args makes it)."""

    mode: UpstreamMode
    deployments: tuple[Backend, ...]  # in settings order
    default_deployment: str  # served at /v1/
    # The gateway settings, resolved: their defaults live in stacks/schema.py only.
    client_max_body_size_mib: int
    read_timeout_seconds: int
    load_balancing: LoadBalancing
    affinity_header: str
    requests_per_second: float
    burst: int
    priority_classes: Mapping[str, int]
    default_priority_class: str
    session_ttl_seconds: int
    affinity_load_bound: float
    # Session placements shared by the replicas through the sidecar's Redis (sessionAffinity).
    shared_placement: bool = False
    keys: Mapping[str, KeyPolicy] = field(default_factory=dict)
    listen: str = str(GATEWAY_PORT)
    status_listen: str = f"127.0.0.1:{GATEWAY_STATUS_PORT}"  # the exporter sidecar only
    metrics_listen: str = str(GATEWAY_METRICS_PORT)  # Prometheus: routing metrics only
    quota_address: str = f"127.0.0.1:{GATEWAY_QUOTA_PORT}"  # the quota sidecar
    paths: NginxPaths = field(default_factory=NginxPaths)
    worker_processes: int = 2


def build_nginx_conf_args(
    settings: Settings,
    *,
    mode: UpstreamMode = "cluster",
    static_addresses: Mapping[str, Sequence[str]] | None = None,
    paths: NginxPaths | None = None,
) -> NginxConfArgs:
    """The config args of a stack (listening on the pod's ports). Static mode takes the
    host:port list of every deployment from `static_addresses`; cluster mode addresses each
    deployment's leader Service, and each group's leader pod for session affinity."""
    g = settings.gateway
    namespace = settings.serving.namespace

    def addresses(name: str) -> tuple[str, ...]:
        if mode == "cluster":
            host = service_host(leader_service_name(name), namespace)
            return (f"{host}:{VLLM_PORT}",)
        found = (static_addresses or {}).get(name)
        if not found:
            raise ValueError(f"static mode needs the addresses of deployment {name!r}")
        return tuple(found)

    def engine_addresses(d: DeploymentSettings) -> tuple[str, ...]:
        if mode == "static":
            return addresses(d.name)
        groups = max(d.replicas, d.autoscaling.max_replicas)
        return tuple(
            f"{leader_address(d.name, namespace, i)}.svc.cluster.local:{VLLM_PORT}"
            for i in range(groups)
        )

    def encoder_addresses(d: DeploymentSettings) -> tuple[str, ...]:
        """The vision tier's encoders: their headless Service, or the static ones given."""
        if not disaggregated(d):
            return ()
        if mode == "cluster":
            return (f"{service_host(encoder_name(d.name), namespace)}:{VLLM_PORT}",)
        return tuple((static_addresses or {}).get(encoder_name(d.name), ()))

    return NginxConfArgs(
        mode=mode,
        deployments=tuple(
            Backend(
                name=d.name,
                addresses=addresses(d.name),
                engine_addresses=engine_addresses(d),
                models=(d.served_model_name or d.name, *d.model_aliases),
                model_id=d.model,
                priority=d.priority_scheduling,
                max_images=d.limit_mm_per_prompt.get("image"),
                encoder_mode=disaggregated(d),
                encoder_addresses=encoder_addresses(d),
                vision=d.vision,
            )
            for d in settings.serving.deployments
        ),
        default_deployment=settings.default_deployment.name,
        paths=paths or NginxPaths(),
        client_max_body_size_mib=g.client_max_body_size_mib,
        read_timeout_seconds=g.read_timeout_seconds,
        load_balancing=g.load_balancing,
        affinity_header=g.affinity_header,
        requests_per_second=g.rate_limit.requests_per_second,
        burst=g.rate_limit.burst,
        priority_classes=dict(g.priority_classes),
        default_priority_class=g.default_priority_class,
        session_ttl_seconds=g.session_ttl_seconds,
        affinity_load_bound=g.affinity_load_bound,
        shared_placement=shared_placement(settings),
        keys={
            key_id: KeyPolicy(
                priority_class=policy.priority_class or g.default_priority_class,
                requests_per_minute=policy.requests_per_minute,
            )
            for key_id, policy in g.api_keys.items()
        },
    )


def quota_enabled(args: NginxConfArgs) -> bool:
    return any(k.requests_per_minute for k in args.keys.values())


def shared_placement(settings: Settings) -> bool:
    """Several replicas with session affinity keep each session's engine in Redis."""
    g = settings.gateway
    return (
        g.load_balancing == "sessionAffinity"
        and g.shared_session_placement
        and g.replicas > 1
        and settings.redis.enabled
    )


def sidecar_enabled(args: NginxConfArgs) -> bool:
    """The sidecar (gateway_quota.py) runs for quotas and for shared session placement."""
    return quota_enabled(args) or placement_enabled(args)


def placement_enabled(args: NginxConfArgs) -> bool:
    return args.shared_placement and args.load_balancing == "sessionAffinity"


def render_routes_js(args: NginxConfArgs, created: int = 0) -> str:
    """The routing tier's data module (ConfigMap `routes.js`): JSON is valid JavaScript."""
    _check(args)
    data = {
        "defaultDeployment": args.default_deployment,
        "affinity": args.load_balancing == "sessionAffinity",
        "affinityHeader": args.affinity_header,
        "loadBound": args.affinity_load_bound,
        "sharedPlacement": placement_enabled(args),
        "sessionTtl": args.session_ttl_seconds,
        "failTimeout": FAIL_TIMEOUT_SECONDS,
        "created": created,
        "quota": quota_enabled(args),
        "classes": dict(args.priority_classes),
        "defaultClass": args.default_priority_class,
        "keys": {
            key_id: {"class": k.priority_class, "rpm": k.requests_per_minute}
            for key_id, k in sorted(args.keys.items())
        },
        "models": {m: d.name for d in args.deployments for m in d.models},
        "deployments": {
            d.name: {
                "upstream": d.upstream,
                "engines": list(d.engines),
                "engineAddresses": list(d.engine_addresses),
                "model": d.model_id,
                "priority": d.priority,
                "maxImages": d.max_images,
                "encoder": d.encoder,
            }
            for d in args.deployments
        },
    }
    header = (
        "// Rendered by components/render/nginx_conf.py (render_routes_js); edits are overwritten."
    )
    return f"{header}\nexport default {json.dumps(data, indent=1)};\n"


def router_source() -> str:
    """The routing tier's code (ConfigMap `router.js`), the same for every stack."""
    return ROUTER_SOURCE.read_text()


# ---------------------------------------------------------------------------- secrets


def render_api_keys_map(keys: Mapping[str, str]) -> str:
    """The Secret include that maps a client's Authorization header to its key id.

    Requests whose header matches no key get the empty id and a 401; the id (never the
    key) is what the access log and the per-key rate limit see.
    """
    if not keys:
        raise ValueError("at least one client API key is needed")
    lines = [
        "# Client API keys (Secret). Header -> key id; never log or print this file.",
        "map $http_authorization $api_key_id {",
        '    default "";',
    ]
    for key_id, key in sorted(keys.items()):
        if not KEY_ID.match(key_id):
            raise ValueError(f"API key id {key_id!r} must be a DNS label (a-z, 0-9, -)")
        lines.append(f'    "Bearer {_checked_key(key)}" "{key_id}";')
    return "\n".join([*lines, "}", ""])


def render_engine_auth(engine_key: str) -> str:
    """The Secret include that replaces the client's Authorization with the engine key."""
    return f'proxy_set_header Authorization "Bearer {_checked_key(engine_key)}";\n'


@dataclass(frozen=True)
class GatewayInclude:
    """A file nginx.conf loads, where `args.paths` puts it; `secret`: from the gateway Secret."""

    path: Path
    text: str
    secret: bool


def gateway_includes(
    args: NginxConfArgs, client_keys: Mapping[str, str], engine_key: str
) -> list[GatewayInclude]:
    """Every file the rendered nginx.conf loads besides itself, for a gateway run outside a pod."""
    secrets, conf = Path(args.paths.secrets_dir), Path(args.paths.conf_dir)
    return [
        GatewayInclude(conf / ROUTER_FILE, router_source(), secret=False),
        GatewayInclude(conf / ROUTES_FILE, render_routes_js(args), secret=False),
        GatewayInclude(secrets / API_KEYS_FILE, render_api_keys_map(client_keys), secret=True),
        GatewayInclude(secrets / ENGINE_AUTH_FILE, render_engine_auth(engine_key), secret=True),
    ]


def render_resolver_conf(nameserver: str, port: int | None = None) -> str:
    """The runtime include of cluster mode: the pod writes it at start from the first
    nameserver of its /etc/resolv.conf (kube-dns), whose address no config can know."""
    address = f"[{nameserver}]" if ":" in nameserver else nameserver
    if port is not None:
        address += f":{port}"
    return RESOLVER_TEMPLATE.format(address=address) + "\n"


def _checked_key(key: str) -> str:
    if not _KEY_VALUE.match(key):
        # Never echo the key itself: this message may end up in a log.
        raise ValueError("an API key must be at least 8 characters of [A-Za-z0-9._~+/=-]")
    return key


# ---------------------------------------------------------------------------- the config


def render_nginx_conf(args: NginxConfArgs) -> str:
    """The complete nginx.conf for `args` (daemon off: nginx runs as the container's PID 1)."""
    _check(args)
    p = args.paths
    lines = [
        "# Rendered by components/render/nginx_conf.py (render_nginx_conf); edits are overwritten.",
        "daemon off;",
        f"load_module {JS_MODULE};",
        f"worker_processes {args.worker_processes};",
        f"pid {p.runtime_dir}/nginx.pid;",
        "error_log stderr warn;",
        "",
        *_block("events", ["worker_connections 4096;"]),
        "",
        *_block("http", _http(args)),
    ]
    return "\n".join(lines) + "\n"


def rate_directive(requests_per_second: float) -> str:
    """nginx takes whole requests per second or per minute: 20 -> 20r/s, 0.5 -> 30r/m."""
    if float(requests_per_second).is_integer():
        return f"{int(requests_per_second)}r/s"
    return f"{round(requests_per_second * 60)}r/m"


def _check(args: NginxConfArgs) -> None:
    names = [d.name for d in args.deployments]
    if args.default_deployment not in names:
        raise ValueError(f"default deployment {args.default_deployment!r} is not in {names}")
    if not HEADER_NAME.match(args.affinity_header):
        raise ValueError(f"affinity header {args.affinity_header!r} is not a header name")
    for backend in args.deployments:
        if not backend.addresses:
            raise ValueError(f"upstream {backend.name!r} has no server")
    if round(args.requests_per_second * 60) < 1:
        raise ValueError("the rate limit must allow at least 1 request per minute")
    classes = {args.default_priority_class, *(k.priority_class for k in args.keys.values())}
    if unknown := sorted(classes - set(args.priority_classes)):
        raise ValueError(f"priority classes {unknown} are not in {sorted(args.priority_classes)}")
    models = [m for d in args.deployments for m in d.models]
    if len(models) != len(set(models)):
        raise ValueError(f"a model name is served by two deployments: {models}")


def _block(head: str, body: Iterable[str]) -> list[str]:
    return [f"{head} {{", *(f"    {line}" if line else "" for line in body), "}"]


def _error_body(message: str, type_: str, code: str) -> str:
    """An OpenAI-style error as a quoted nginx string (no variables: nothing is interpolated)."""
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})
    if any(c in body for c in "'\\$"):
        raise ValueError(f"error message needs nginx escaping: {message!r}")
    return f"'{body}\\n'"


def _http(args: NginxConfArgs) -> list[str]:
    p = args.paths
    mode = UPSTREAM_MODES[args.mode]
    resolver = mode["resolver"]
    lines = [
        *(
            f"{kind}_temp_path {p.runtime_dir}/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        ),
        "default_type application/json;",
        "server_tokens off;",
        *_log_format(),
        f"access_log {p.access_log} gateway_json;",
        "",
        "# Streaming: every SSE event is passed on as it arrives (docs/reference/peers.md#proxy-streaming).",
        "gzip off;",
        "proxy_buffering off;",
        "# Bodies are read whole before the engine is chosen, so a connect failure can still",
        "# be retried on another engine and a slow upload never holds an engine connection.",
        "proxy_request_buffering on;",
        f"client_max_body_size {args.client_max_body_size_mib}m;",
        "# The router reads `model` from the body, so bodies stay in memory up to the size limit",
        "# (nginx allocates what the request's Content-Length asks, not the limit).",
        f"client_body_buffer_size {args.client_max_body_size_mib}m;",
        "client_body_in_single_buffer on;",
        "client_body_timeout 60s;",
        "client_header_timeout 30s;",
        "keepalive_timeout 75s;",
        f"send_timeout {args.read_timeout_seconds}s;",
        f"proxy_read_timeout {args.read_timeout_seconds}s;",
        "proxy_send_timeout 60s;",
        f"proxy_connect_timeout {CONNECT_TIMEOUT_SECONDS}s;",
        "proxy_http_version 1.1;",
        "# Retry elsewhere only while nothing was sent: no non_idempotent, so a POST moves on",
        "# only when it never reached an engine; a stream that started is never replayed.",
        "proxy_next_upstream error timeout http_502 http_503;",
        f"proxy_next_upstream_tries {NEXT_UPSTREAM_TRIES};",
        f"proxy_next_upstream_timeout {NEXT_UPSTREAM_TIMEOUT_SECONDS}s;",
        "reset_timedout_connection on;",
        "map_hash_bucket_size 128;",
        "",
        f"include {p.secrets_dir}/{API_KEYS_FILE};",
        *([resolver.format(runtime_dir=p.runtime_dir)] if resolver else []),
        f"limit_req_zone $api_key_id zone=per_key:10m rate={rate_directive(args.requests_per_second)};",
        "limit_req_status 429;",
        "limit_req_log_level warn;",
        "",
        *_router(args),
    ]
    for backend in args.deployments:
        lines += ["", *_upstream(args, backend)]
        if args.load_balancing == "sessionAffinity":
            for name, address in zip(backend.engines, backend.engine_addresses, strict=True):
                lines += ["", *_engine_upstream(args, backend, name, address)]
    for backend in args.deployments:
        if backend.encoder:
            lines += ["", *_encoder_upstream(args, backend)]
    if sidecar_enabled(args):
        lines += [
            "",
            *_block(
                "upstream gateway_quota",
                [
                    f"server {args.quota_address};",
                    "keepalive 8;",
                    # Frees the sidecar's thread of an idle connection (it never times one out).
                    f"keepalive_timeout {UPSTREAM_KEEPALIVE_TIMEOUT_SECONDS}s;",
                ],
            ),
        ]
    return [
        *lines,
        "",
        *_block("server", _api_server(args)),
        "",
        *_block("server", _status_server(args)),
        "",
        *_block("server", _metrics_server(args)),
    ]


def _router(args: NginxConfArgs) -> list[str]:
    """The njs routing tier: its module, its shared state and the variables it hands nginx."""
    return [
        "# The routing tier (components/render/gateway_router.js, docs/gateway.md#routing-tier).",
        f"js_path {args.paths.conf_dir};",
        f"js_import router from {ROUTER_FILE};",
        f"js_shared_dict_zone zone=gateway_sessions:16m timeout={args.session_ttl_seconds}s evict;",
        "js_shared_dict_zone zone=gateway_engines:1m type=number;",
        "js_shared_dict_zone zone=gateway_metrics:4m type=number;",
        "js_var $deployment;",
        "js_var $route_upstream;",
        "js_var $route_uri;",
        "js_var $route_engine;",
        "js_var $route_body;",
        "# Evaluated by the access log, i.e. when the request is over: open-request bookkeeping.",
        "js_set $route_done router.finished;",
    ]


def _log_format() -> list[str]:
    # Key id, never the key or the Authorization header; path without the query string.
    fields = [
        ("time", '"$time_iso8601"'),
        ("request_id", '"$request_id"'),
        ("key_id", '"$api_key_id"'),
        ("deployment", '"$deployment"'),
        ("route", '"$route_done"'),
        ("remote_addr", '"$remote_addr"'),
        ("method", '"$request_method"'),
        ("path", '"$uri"'),
        ("status", "$status"),
        ("request_length", "$request_length"),
        ("bytes_sent", "$bytes_sent"),
        ("body_bytes_sent", "$body_bytes_sent"),
        ("request_time", "$request_time"),
        ("upstream_addr", '"$upstream_addr"'),
        ("upstream_status", '"$upstream_status"'),
        ("upstream_connect_time", '"$upstream_connect_time"'),
        ("upstream_header_time", '"$upstream_header_time"'),
        ("upstream_response_time", '"$upstream_response_time"'),
    ]
    body = ",".join(f'"{name}":{value}' for name, value in fields)
    return ["log_format gateway_json escape=json", f"    '{{{body}}}';"]


def _upstream(args: NginxConfArgs, backend: Backend) -> list[str]:
    server = UPSTREAM_MODES[args.mode]["server"]
    assert server is not None
    health = f"max_fails={MAX_FAILS} fail_timeout={FAIL_TIMEOUT_SECONDS}s"
    # Sessions go to the per-engine upstreams the router picks; requests without a session
    # come here and go to the engine with the fewest open requests.
    balance = ["least_conn;"]
    return _block(
        f"upstream {backend.upstream}",
        [
            f"zone {backend.upstream} 256k;",
            *balance,
            *(server.format(address=a, health=health) for a in backend.addresses),
            "keepalive 32;",
            f"keepalive_timeout {UPSTREAM_KEEPALIVE_TIMEOUT_SECONDS}s;",
        ],
    )


def _engine_upstream(args: NginxConfArgs, backend: Backend, name: str, address: str) -> list[str]:
    """One engine of a deployment, the router's pick for a session; the others are its
    backups, so a request still lands when the picked engine is gone."""
    server = UPSTREAM_MODES[args.mode]["server"]
    assert server is not None
    health = f"max_fails={MAX_FAILS} fail_timeout={FAIL_TIMEOUT_SECONDS}s"
    backups = [a for a in backend.engine_addresses if a != address]
    return _block(
        f"upstream {name}",
        [
            f"zone {name} 64k;",
            server.format(address=address, health=health),
            *(server.format(address=a, health=f"{health} backup") for a in backups),
            "keepalive 16;",
            f"keepalive_timeout {UPSTREAM_KEEPALIVE_TIMEOUT_SECONDS}s;",
        ],
    )


_UNAUTHORIZED = _error_body(
    "Missing or invalid API key: send the header Authorization: Bearer <your gateway key>.",
    "invalid_request_error",
    "invalid_api_key",
)
_NOT_FOUND = _error_body(
    "Unknown path. This gateway serves the OpenAI API at /v1/... (default model) and "
    "/<deployment>/v1/... (one model).",
    "invalid_request_error",
    "unknown_url",
)
_GENERATE_GONE = _error_body(
    "/generate is not served by vLLM 0.33: use POST /v1/chat/completions (OpenAI chat format; "
    "images as image_url data URLs).",
    "invalid_request_error",
    "endpoint_removed",
)
_BAD_GATEWAY = _error_body(
    "No model server answered; it may be starting or restarting. Retry later.",
    "server_error",
    "upstream_unavailable",
)
_GATEWAY_TIMEOUT = _error_body(
    "The model server did not answer in time.", "server_error", "upstream_timeout"
)


def _too_large(args: NginxConfArgs) -> str:
    return _error_body(
        f"Request body larger than the gateway limit of {args.client_max_body_size_mib} MiB "
        "(gateway.clientMaxBodySizeMib).",
        "invalid_request_error",
        "request_too_large",
    )


def _blocked_regex() -> str:
    alternatives = "|".join(re.escape(path.lstrip("/")) for path in BLOCKED_PATHS)
    return f'"^(/[^/]+)?/({alternatives})(/|$)"'


def _api_server(args: NginxConfArgs) -> list[str]:
    lines = [
        f"listen {args.listen};",
        "server_name _;",
        "add_header X-Request-Id $request_id always;",
        "error_page 413 @too_large;",
        "error_page 429 @rate_limited;",
        "error_page 502 @bad_gateway;",
        "error_page 504 @gateway_timeout;",
        "",
        *_block(
            f"location = {HEALTH_PATH}", ["access_log off;", """return 200 '{"status":"ok"}\\n';"""]
        ),
        *_block(f"location ~ {_blocked_regex()}", [f"return 404 {_NOT_FOUND};"]),
        *_api_location(args, "= /v1/models", "router.models"),
        *_api_location(args, "/v1/models/", "router.models"),
        *_api_location(args, "/v1/", "router.dispatch"),
    ]
    for d in args.deployments:
        lines += _api_location(args, f"/{d.name}/v1/", "router.dispatch")
    lines += [
        *_api_location(args, f"= {CHAT_ALIAS}", "router.dispatch"),
        *_block(f"location = {REMOVED_GENERATE}", [f"return 410 {_GENERATE_GONE};"]),
        *_block("location @engine", _proxy(args)),
        *_block("location @engine_rewritten", ["proxy_set_body $route_body;", *_proxy(args)]),
    ]
    if quota_enabled(args):
        lines += _block(f"location = {QUOTA_PATH}", _quota_proxy())
    if placement_enabled(args):
        lines += _block(f"location = {PLACEMENT_PATH}", _placement_proxy())
    for d in args.deployments:
        if d.encoder:
            lines += _block(f"location {ENCODER_PATH}/{d.name}/", _encoder_proxy(args, d))
    return [
        *lines,
        *_block("location /", [f"return 404 {_NOT_FOUND};"]),
        *_block("location @too_large", [f"return 413 {_too_large(args)};"]),
        *_block("location @rate_limited", ["js_content router.rateLimited;"]),
        *_block("location @bad_gateway", [f"return 502 {_BAD_GATEWAY};"]),
        *_block("location @gateway_timeout", [f"return 504 {_GATEWAY_TIMEOUT};"]),
        *_block(
            "location @session_recount",
            [f"js_periodic router.recount interval={SESSION_RECOUNT_SECONDS}s;"],
        ),
        *(
            _block(
                "location @engine_health",
                [
                    f"js_periodic router.probe interval={HEALTH_PROBE_SECONDS}s;",
                    f"js_fetch_timeout {HEALTH_PROBE_TIMEOUT_SECONDS}s;",
                ],
            )
            if args.load_balancing == "sessionAffinity"
            else []
        ),
    ]


def _api_location(args: NginxConfArgs, match: str, handler: str) -> list[str]:
    """Auth and the per-pod rate limit in nginx, then the router (njs) takes the request."""
    return _block(
        f"location {match}",
        [
            *_block('if ($api_key_id = "")', [f"return 401 {_UNAUTHORIZED};"]),
            f"limit_req zone=per_key burst={args.burst} nodelay;",
            f"js_content {handler};",
        ],
    )


def _proxy(args: NginxConfArgs) -> list[str]:
    """Where the router hands a request back to nginx: the engine it picked, the answer
    streamed back (the body read once, by nginx, before the router ran)."""
    return [
        "internal;",
        # Any proxy_set_header here drops inherited ones, so all of them are listed here.
        'proxy_set_header Connection "";',
        "proxy_set_header X-Request-Id $request_id;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        f"include {args.paths.secrets_dir}/{ENGINE_AUTH_FILE};",
        "add_header X-Request-Id $request_id always;",
        "# For any buffering proxy the client puts in front of us.",
        "add_header X-Accel-Buffering no always;",
        "proxy_pass http://$route_upstream$route_uri;",
    ]


def _encoder_upstream(args: NginxConfArgs, backend: Backend) -> list[str]:
    """The vision encoder tier of a disaggregated deployment (issue 17 fills in the details)."""
    server = UPSTREAM_MODES[args.mode]["server"]
    assert server is not None
    health = f"max_fails={MAX_FAILS} fail_timeout={FAIL_TIMEOUT_SECONDS}s"
    return _block(
        f"upstream {backend.encoder_upstream}",
        [
            f"zone {backend.encoder_upstream} 64k;",
            "least_conn;",
            *(server.format(address=a, health=health) for a in backend.encoder_addresses),
            "keepalive 16;",
            f"keepalive_timeout {UPSTREAM_KEEPALIVE_TIMEOUT_SECONDS}s;",
        ],
    )


def _encoder_proxy(args: NginxConfArgs, backend: Backend) -> list[str]:
    """The router's encoder pre-step (a subrequest carrying its own body); the request id
    comes as `rid`, since a subrequest has an id of its own."""
    return [
        "internal;",
        'proxy_set_header Connection "";',
        "proxy_set_header X-Request-Id $arg_rid;",
        f"include {args.paths.secrets_dir}/{ENGINE_AUTH_FILE};",
        *_encoder_limits(backend),
        f"proxy_pass http://{backend.encoder_upstream}/;",
    ]


def _encoder_limits(backend: Backend) -> list[str]:
    """Per attempt vision.timeoutSeconds, then another encoder up to vision.retries times; a POST
    is retried only with non_idempotent (the encoder step has no side effect but a cache file)."""
    if backend.vision is None:
        return []
    timeout = f"{round(backend.vision.timeout_seconds * 1000)}ms"
    return [
        f"proxy_connect_timeout {timeout};",
        f"proxy_send_timeout {timeout};",
        f"proxy_read_timeout {timeout};",
        "proxy_next_upstream error timeout http_500 http_502 http_503 http_504 non_idempotent;",
        f"proxy_next_upstream_tries {1 + backend.vision.retries};",
    ]


def _quota_proxy() -> list[str]:
    """The router's quota question to the sidecar: headers only, never the (large) body."""
    return [
        "internal;",
        "proxy_pass_request_body off;",
        'proxy_set_header Content-Length "";',
        'proxy_set_header Connection "";',
        "proxy_connect_timeout 1s;",
        "proxy_read_timeout 2s;",
        "proxy_pass http://gateway_quota/check$is_args$args;",
    ]


def _placement_proxy() -> list[str]:
    """The router's placement question (new sessions only): short bounds, since the request
    waits for it; past them the router places the session itself."""
    return [
        "internal;",
        "proxy_pass_request_body off;",
        'proxy_set_header Content-Length "";',
        'proxy_set_header Connection "";',
        "proxy_connect_timeout 200ms;",
        "proxy_read_timeout 500ms;",
        "proxy_pass http://gateway_quota/placement$is_args$args;",
    ]


def _status_server(args: NginxConfArgs) -> list[str]:
    return [
        f"listen {args.status_listen};",
        "access_log off;",
        *_block(f"location = {STATUS_PATH}", ["stub_status;"]),
        *_block("location /", ["return 404;"]),
    ]


def _metrics_server(args: NginxConfArgs) -> list[str]:
    """The router's counters for Prometheus (no keys in them: key ids only)."""
    return [
        f"listen {args.metrics_listen};",
        "access_log off;",
        *_block(f"location = {METRICS_PATH}", ["js_content router.metrics;"]),
        *(
            _block(
                "location = /_quota_metrics",
                ["internal;", "proxy_pass http://gateway_quota/metrics;"],
            )
            if sidecar_enabled(args)
            else []
        ),
        *_block("location /", ["return 404;"]),
    ]
