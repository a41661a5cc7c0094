"""The gateway on loopback: real nginx with the stack's rendered config in front of engine stand-ins (HTTP handlers in this process), for the behaviour, artifact and load tests."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from components.render.nginx_conf import (
    CONF_FILE,
    HEALTH_PATH,
    QUOTA_SOURCE,
    Backend,
    NginxConfArgs,
    NginxPaths,
    gateway_includes,
    render_nginx_conf,
)
from stacks.schema import GatewaySettings, RateLimitSettings, default_of
from tests.support.local import free_port

ROOT = Path(__file__).resolve().parents[2]

ENGINE_KEY = "EngineKey0123456789abcdefABCDEF0123456789"


CLIENT_KEYS = {
    "default": "ClientKeyDefault0123456789abcdefABCDEF01",
    "loadtest": "ClientKeyLoadtest123456789abcdefABCDEF01",
}


SSE_EVENTS = 3


MIB = 2**20


BODY_LIMIT_MIB = 12


NOBODY = 65534  # nginx's unprivileged user here, as uid 101 is in the gateway pod


class _EngineHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5  # idle keep-alive, as vLLM's uvicorn (VLLM_HTTP_TIMEOUT_KEEP_ALIVE)
    name = ""
    engine_key = ""

    def log_message(self, format: str, *args: Any) -> None:
        del format, args

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle's algorithm and
        # nginx's delayed ACK add 40 ms to every reply on a kept-alive connection.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._answer(b"")

    def do_POST(self) -> None:
        self._answer(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

    def _answer(self, body: bytes) -> None:
        request = json.loads(body) if body.lstrip().startswith(b"{") else {}
        query = urlsplit(self.path).query
        if request.get("close") or "close=1" in query:
            self.close_connection = True  # no response at all: nginx sees the engine drop it
            return
        time.sleep(float(request.get("delay", 0)))
        if self.path.startswith("/v1/") and (
            self.headers.get("Authorization") != f"Bearer {self.engine_key}"
        ):
            self._json(401, {"error": {"message": "engine key expected", "code": 401}})
        elif request.get("stream"):
            self._stream(float(request.get("event_delay", SSE_DELAY)))
        else:
            self._json(
                200,
                {
                    "upstream": self.name,
                    "path": self.path,
                    "body_bytes": len(body),
                    "session": self.headers.get("X-Session-Id"),
                    "request_id": self.headers.get("X-Request-Id"),
                    # What the router may rewrite or route by, as the engine received it.
                    "model": request.get("model"),
                    "priority": request.get("priority"),
                    "body_priorities": body.count(b'"priority"'),
                },
            )

    def _json(self, status: int, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Upstream", self.name)
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, delay: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Upstream", self.name)
        self.end_headers()
        for i in range(SSE_EVENTS):
            event = f"data: {json.dumps({'index': i, 'upstream': self.name})}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
            if i < SSE_EVENTS - 1:
                time.sleep(delay)
        done = b"data: [DONE]\n\n"
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))


def serve(name: str, engine_key: str, host: str = "127.0.0.1", port: int = 0) -> None:
    """Run one stand-in engine; print its port, then serve until killed."""
    handler = type("Handler", (_EngineHandler,), {"name": name, "engine_key": engine_key})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


@dataclass
class StandIn:
    name: str
    address: str  # host:port (the host alone until it has started)
    proc: subprocess.Popen[str]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def stand_ins(
    names: list[str], hosts: list[str] | None = None, port: int = 0
) -> Iterator[list[StandIn]]:
    """Start one stand-in engine per name, on loopback or on the matching entry of `hosts`
    (all at once: each takes ~1 s to import this module); always kill and reap them all."""
    started: list[StandIn] = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        for name, host in zip(names, hosts or ["127.0.0.1"] * len(names), strict=True):
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.support.gateway_run",
                    "serve",
                    name,
                    ENGINE_KEY,
                    host,
                    str(port),
                ],
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                env=env,
            )
            started.append(StandIn(name, host, proc))
        for s in started:
            assert s.proc.stdout is not None
            ready, _, _ = select.select([s.proc.stdout], [], [], 30)
            line = s.proc.stdout.readline() if ready else ""
            assert line.strip().isdigit(), f"stand-in {s.name} did not start (exit {s.proc.poll()})"
            s.address = f"{s.address}:{line.strip()}"
        yield started
    finally:
        for s in started:
            s.kill()


def scratch_paths(directory: str) -> NginxPaths:
    return NginxPaths(
        secrets_dir=f"{directory}/secrets",
        runtime_dir=f"{directory}/run",
        conf_dir=f"{directory}/run",
        access_log=f"{directory}/access.log",
    )


def gateway_args(
    directory: str, deployments: Mapping[str, list[StandIn]], **changes: Any
) -> NginxConfArgs:
    """Static-mode args for the stand-ins, every path under `directory` (as nginx sees it)."""
    args = NginxConfArgs(
        mode="static",
        deployments=tuple(
            Backend(
                name=n,
                addresses=tuple(s.address for s in engines),
                engine_addresses=tuple(s.address for s in engines),
                models=(f"model-{n}",),
                model_id=f"org/{n}",
            )
            for n, engines in deployments.items()
        ),
        default_deployment=next(iter(deployments)),
        listen=f"127.0.0.1:{free_port()}",
        status_listen=f"127.0.0.1:{free_port()}",
        metrics_listen=f"127.0.0.1:{free_port()}",
        paths=scratch_paths(directory),
        **schema_defaults(),
    )
    # The rate limit out of the way: these tests send bursts on purpose.
    limits = {
        "client_max_body_size_mib": BODY_LIMIT_MIB,
        "requests_per_second": 1000,
        "burst": 1000,
    }
    return replace(args, **(limits | changes))


def write_gateway_files(root: Path, args: NginxConfArgs, conf_text: str | None = None) -> Path:
    """Write nginx.conf and the Secret includes where `args` says (under `root`); return the conf."""
    p = args.paths
    for directory in (p.secrets_dir, p.runtime_dir):
        (root / directory.lstrip("/")).mkdir(parents=True, exist_ok=True)
    (root / p.conf_dir.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for file in gateway_includes(args, CLIENT_KEYS, ENGINE_KEY):
        (root / str(file.path).lstrip("/")).write_text(file.text)
    conf = root / p.runtime_dir.lstrip("/") / CONF_FILE
    conf.write_text(conf_text if conf_text is not None else render_nginx_conf(args))
    return conf


@contextlib.contextmanager
def scratch_dir(parent: Path = Path("/tmp")) -> Iterator[Path]:
    """A directory for one gateway's files (pytest's tmp_path is closed to nginx's user)."""
    path = Path(tempfile.mkdtemp(prefix="qwen-vl-gateway-", dir=parent))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def running_gateway(
    args: NginxConfArgs,
    directory: Path,
    *,
    root: Path = Path("/"),
    command: tuple[str, ...] | None = None,
) -> Iterator[Gateway]:
    """nginx in the foreground with `args`, whose paths lie in `directory` as seen from
    `root` (a chroot when `command` runs nginx inside one)."""
    conf = write_gateway_files(root, args)
    if os.geteuid() == 0:
        for path in (directory, *directory.rglob("*")):
            os.chown(path, NOBODY, NOBODY)
    inside = "/" + str(conf.relative_to(root))
    error_log = conf.parent / "stderr.log"
    url = f"http://{args.listen}"
    with error_log.open("wb") as stderr:
        proc = subprocess.Popen(
            [*(command or host_nginx()), "-c", inside, "-p", args.paths.runtime_dir + "/"],
            stdout=stderr,
            stderr=stderr,
            start_new_session=True,
        )
    gateway = Gateway(url, root / args.paths.access_log.lstrip("/"), error_log, proc)
    try:
        deadline = time.monotonic() + 10
        while not _healthy(url):
            assert proc.poll() is None, f"nginx exited: {error_log.read_text()}"
            assert time.monotonic() < deadline, f"nginx not up: {error_log.read_text()}"
            time.sleep(0.05)
        yield gateway
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this test created for nginx
            proc.wait(timeout=10)


@contextlib.contextmanager
def quota_sidecar(
    listen: str, limits: Mapping[str, int], redis: str = "", replicas: int = 1
) -> Iterator[subprocess.Popen[str]]:
    """The gateway pod's quota sidecar (components/render/gateway_quota.py) on loopback."""
    argv = [sys.executable, str(QUOTA_SOURCE), "--listen", listen, "--replicas", str(replicas)]
    argv += ["--redis", redis] if redis else []
    argv += [f"--limit={k}={v}" for k, v in limits.items()]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(f"http://{listen}/metrics", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, f"quota sidecar exited: {proc.stderr}"
                assert time.monotonic() < deadline, "quota sidecar not up"
                time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def bearer(key_id: str = "default") -> dict[str, str]:
    return {"Authorization": f"Bearer {CLIENT_KEYS[key_id]}"}


SSE_DELAY = 0.4  # seconds the stand-in waits between two events


@dataclass
class Gateway:
    url: str
    access_log: Path
    error_log: Path
    proc: subprocess.Popen[bytes]

    def log_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.access_log.read_text().splitlines()]


SID_NGINX = ROOT / "scripts" / "sid-nginx.sh"
SID_CHROOT = Path(os.environ.get("NGINX_CHROOT", "/var/cache/qwen-vl/nginx-sid"))
# What running the gateway needs: root (the wrapper's mount namespace) and the chroot with njs.
SID_NGINX_READY = (
    os.geteuid() == 0 and (SID_CHROOT / "usr/lib/nginx/modules/ngx_http_js_module.so").exists()
)


def host_nginx() -> tuple[str, ...]:
    """nginx with njs (the sid chroot's, the only one here with njs >= 0.8), unprivileged as in
    the pod, seeing this host's /tmp, where the tests put every file."""
    return (str(SID_NGINX), "--user", f"{NOBODY}:{NOBODY}", "/tmp", "--", "nginx")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + HEALTH_PATH, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def schema_defaults() -> dict[str, Any]:
    """The gateway settings the nginx config takes, at their defaults: read from the schema,
    the only place they are written."""
    gateway = {f.name: default_of(f) for f in fields(GatewaySettings)}
    rate = RateLimitSettings()
    return {
        "priority_classes": dict(gateway["priority_classes"]),
        "default_priority_class": gateway["default_priority_class"],
        "session_ttl_seconds": gateway["session_ttl_seconds"],
        "affinity_load_bound": gateway["affinity_load_bound"],
        "client_max_body_size_mib": gateway["client_max_body_size_mib"],
        "read_timeout_seconds": gateway["read_timeout_seconds"],
        "load_balancing": gateway["load_balancing"],
        "affinity_header": gateway["affinity_header"],
        "requests_per_second": rate.requests_per_second,
        "burst": rate.burst,
    }


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    _name, _key, _host, _port = sys.argv[2:6]
    serve(_name, _key, _host, int(_port))
