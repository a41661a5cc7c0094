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
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Literal

from stacks.naming import (
    BLOCKED_PATHS,
    GATEWAY_PORT,
    GATEWAY_STATUS_PORT,
    HEADER_NAME,
    KEY_ID,
    VLLM_PORT,
    leader_service_name,
    service_host,
)

if TYPE_CHECKING:
    from stacks.schema import Settings

UpstreamMode = Literal["cluster", "static"]
LoadBalancing = Literal["leastConn", "sessionAffinity"]


# The gateway pod mounts the ConfigMap here; file names inside the mounted directories.
CONF_DIR: Final = "/etc/nginx/gateway"
CONF_FILE: Final = "nginx.conf"
API_KEYS_FILE: Final = "api-keys.map"
ENGINE_AUTH_FILE: Final = "engine-auth.conf"
RESOLVER_FILE: Final = "resolver.conf"

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
# Bodies up to this size stay in memory; larger ones (multi-image requests) are spooled to
# the runtime directory, so memory per request stays bounded at any client_max_body_size.
CLIENT_BODY_BUFFER: Final = "1m"

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
    runtime_dir: str = "/run/gateway"  # emptyDir: pid, spooled bodies, resolver.conf
    access_log: str = "/dev/stdout"


@dataclass(frozen=True, kw_only=True)
class Backend:
    """One upstream group: the leader pods of a deployment."""

    name: str  # deployment name
    addresses: tuple[str, ...]  # host:port

    @property
    def upstream(self) -> str:
        return f"engine-{self.name}"


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
    listen: str = str(GATEWAY_PORT)
    status_listen: str = f"127.0.0.1:{GATEWAY_STATUS_PORT}"  # the exporter sidecar only
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
    deployment's leader Service."""
    g = settings.gateway

    def addresses(name: str) -> tuple[str, ...]:
        if mode == "cluster":
            host = service_host(leader_service_name(name), settings.serving.namespace)
            return (f"{host}:{VLLM_PORT}",)
        found = (static_addresses or {}).get(name)
        if not found:
            raise ValueError(f"static mode needs the addresses of deployment {name!r}")
        return tuple(found)

    return NginxConfArgs(
        mode=mode,
        deployments=tuple(
            Backend(name=d.name, addresses=addresses(d.name)) for d in settings.serving.deployments
        ),
        default_deployment=settings.default_deployment.name,
        paths=paths or NginxPaths(),
        client_max_body_size_mib=g.client_max_body_size_mib,
        read_timeout_seconds=g.read_timeout_seconds,
        load_balancing=g.load_balancing,
        affinity_header=g.affinity_header,
        requests_per_second=g.rate_limit.requests_per_second,
        burst=g.rate_limit.burst,
    )


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


def affinity_variable(header: str) -> str:
    """nginx's variable for a request header: X-Session-Id -> $http_x_session_id."""
    return "$http_" + header.lower().replace("-", "_")


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
        f"client_body_buffer_size {CLIENT_BODY_BUFFER};",
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
    ]
    for backend in args.deployments:
        lines += ["", *_upstream(args, backend)]
    return [
        *lines,
        "",
        *_block("server", _api_server(args)),
        "",
        *_block("server", _status_server(args)),
    ]


def _log_format() -> list[str]:
    # Key id, never the key or the Authorization header; path without the query string.
    fields = [
        ("time", '"$time_iso8601"'),
        ("request_id", '"$request_id"'),
        ("key_id", '"$api_key_id"'),
        ("deployment", '"$deployment"'),
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
    if args.load_balancing == "sessionAffinity":
        # Not `consistent`: ketama points are keyed by the server's *name*, and every leader
        # resolved from the one Service name shares it, so nginx (1.30.6, measured) picks
        # among them round robin. A request without the header has an empty key, which the
        # hash balancer also serves round robin, not all on one engine.
        balance = [f"hash {affinity_variable(args.affinity_header)};"]
    else:
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


_UNAUTHORIZED = _error_body(
    "Missing or invalid API key: send the header Authorization: Bearer <your gateway key>.",
    "invalid_request_error",
    "invalid_api_key",
)
_RATE_LIMITED = _error_body(
    "Rate limit reached for this API key; slow down and retry.", "requests", "rate_limit_exceeded"
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
    default = next(d for d in args.deployments if d.name == args.default_deployment)
    lines = [
        f"listen {args.listen};",
        "server_name _;",
        'set $deployment "";',
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
        *_api_location(args, "/v1/", default, "/v1/"),
    ]
    for d in args.deployments:
        lines += _api_location(args, f"/{d.name}/v1/", d, "/v1/")
    lines += [
        *_api_location(args, f"= {CHAT_ALIAS}", default, CHAT_PATH),
        *_block(f"location = {REMOVED_GENERATE}", [f"return 410 {_GENERATE_GONE};"]),
    ]
    return [
        *lines,
        *_block("location /", [f"return 404 {_NOT_FOUND};"]),
        *_block("location @too_large", [f"return 413 {_too_large(args)};"]),
        *_block("location @rate_limited", [f"return 429 {_RATE_LIMITED};"]),
        *_block("location @bad_gateway", [f"return 502 {_BAD_GATEWAY};"]),
        *_block("location @gateway_timeout", [f"return 504 {_GATEWAY_TIMEOUT};"]),
    ]


def _api_location(args: NginxConfArgs, match: str, backend: Backend, target: str) -> list[str]:
    return _block(
        f"location {match}",
        [
            f"set $deployment {backend.name};",
            *_block('if ($api_key_id = "")', [f"return 401 {_UNAUTHORIZED};"]),
            f"limit_req zone=per_key burst={args.burst} nodelay;",
            # Any proxy_set_header here drops inherited ones, so all of them are listed here.
            'proxy_set_header Connection "";',
            "proxy_set_header X-Request-Id $request_id;",
            "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
            "proxy_set_header X-Forwarded-Proto $scheme;",
            f"include {args.paths.secrets_dir}/{ENGINE_AUTH_FILE};",
            "add_header X-Request-Id $request_id always;",
            "# For any buffering proxy the client puts in front of us.",
            "add_header X-Accel-Buffering no always;",
            f"proxy_pass http://{backend.upstream}{target};",
        ],
    )


def _status_server(args: NginxConfArgs) -> list[str]:
    return [
        f"listen {args.status_listen};",
        "access_log off;",
        *_block(f"location = {STATUS_PATH}", ["stub_status;"]),
        *_block("location /", ["return 404;"]),
    ]
