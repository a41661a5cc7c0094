"""A real OCI registry on loopback for tests: Debian's docker-registry, fed by skopeo.

Needs the Debian packages `docker-registry` (distribution 2.8) and `skopeo`. Images are
built here as OCI image layouts (tar layer, config, manifest, index.json), so nothing is
downloaded. The registry listens on 127.0.0.1 only and is stopped by its PID.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"

START_TIMEOUT = 15.0  # seconds for docker-registry to answer /v2/
SKOPEO_TIMEOUT = 60.0


def missing_tools() -> list[str]:
    return [t for t in ("docker-registry", "skopeo") if shutil.which(t) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _loopback_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Registry:
    """A running docker-registry: `host` is 127.0.0.1:PORT."""

    host: str
    process: subprocess.Popen[bytes]
    log: Path

    def ref(self, repository: str, tag: str) -> str:
        return f"{self.host}/{repository}:{tag}"


def _config(root: Path, port: int, auth: str) -> str:
    # JSON is YAML: no YAML library needed to write the registry's config.
    config = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text"},
        "storage": {"filesystem": {"rootdirectory": str(root / "storage")}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    text = json.dumps(config)
    return text[:-1] + (f', "auth": {auth}}}' if auth else "}")


@contextmanager
def running_registry(workdir: Path, auth: str = "") -> Iterator[Registry]:
    """Start docker-registry on a free loopback port; `auth` is a JSON `auth:` section."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = workdir / "config.yml"
    config.write_text(_config(workdir, port, auth))
    log = workdir / "registry.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["docker-registry", "serve", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    registry = Registry(f"127.0.0.1:{port}", process, log)
    try:
        _wait_ready(registry)
        yield registry
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_ready(registry: Registry) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:  # bounded: at most START_TIMEOUT / 0.1 tries
        if registry.process.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {registry.log.read_text()[-2000:]}")
        try:
            with _loopback_opener().open(f"http://{registry.host}/v2/", timeout=1):
                return
        except urllib.error.HTTPError:
            return  # 401 from a token-auth registry: it is up
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"docker-registry did not answer in {START_TIMEOUT}s")


def _blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _layer(content: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size, info.mtime, info.mode = len(content), 0, 0o644
        tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def _image_manifest(layout: Path, content: bytes, arch: str) -> dict[str, object]:
    """Write one platform's layer, config and manifest; return the manifest's descriptor."""
    layer = _blob(layout, _layer(content))
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/hello.txt"]},
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, **_blob(layout, json.dumps(config).encode())},
        "layers": [{"mediaType": OCI_LAYER, **layer}],
    }
    descriptor = {"mediaType": OCI_MANIFEST, **_blob(layout, json.dumps(manifest).encode())}
    return {**descriptor, "platform": {"architecture": arch, "os": "linux"}}


def build_layout(layout: Path, tag: str, content: bytes, multi_arch: bool = False) -> Path:
    """An OCI image layout holding one image (or a two-platform index) under `tag`."""
    if layout.exists():
        shutil.rmtree(layout)
    layout.mkdir(parents=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    top = _image_manifest(layout, content, "amd64")
    if multi_arch:
        arm = _image_manifest(layout, content + b" arm64", "arm64")
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [top, arm]}
        top = {"mediaType": OCI_INDEX, **_blob(layout, json.dumps(index).encode())}
    top = {k: v for k, v in top.items() if k != "platform"}
    entry = {**top, "annotations": {REF_NAME: tag}}
    (layout / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]})
    )
    return layout


def _skopeo(*args: str) -> bytes:
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    done = subprocess.run(
        ["skopeo", "--insecure-policy", *args],
        capture_output=True,
        timeout=SKOPEO_TIMEOUT,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"skopeo {' '.join(args)}: {done.stderr.decode()}")
    return done.stdout


def push(layout: Path, tag: str, dest: str, multi_arch: bool = False) -> None:
    """skopeo copy oci:LAYOUT:TAG docker://DEST (plain HTTP: --dest-tls-verify=false)."""
    extra = ["--all"] if multi_arch else []
    _skopeo("copy", *extra, "--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{dest}")


def raw_manifest(ref: str) -> bytes:
    return _skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{ref}")


def registry_digest(ref: str) -> str:
    """The digest per skopeo: sha256 of the raw manifest bytes (what `| sha256sum` gives)."""
    return "sha256:" + hashlib.sha256(raw_manifest(ref)).hexdigest()


# --- Token authentication, as docker.io, ghcr.io, nvcr.io and public.ecr.aws do it ---------


@dataclass
class TokenServer:
    """An anonymous token service for docker-registry's `auth: token:` (RS256 JWTs, x5c)."""

    workdir: Path
    service: str = "pin-test-registry"
    issuer: str = "pin-test-issuer"
    port: int = 0
    requests: list[str] | None = None  # query strings of the token requests, for asserts

    @property
    def key(self) -> Path:
        return self.workdir / "token.key"

    @property
    def cert(self) -> Path:
        return self.workdir / "token.crt"

    def auth_config(self) -> str:
        """The registry config's `auth:` section (JSON), pointing at this server."""
        token = {
            "realm": f"http://127.0.0.1:{self.port}/token",
            "service": self.service,
            "issuer": self.issuer,
            "rootcertbundle": str(self.cert),
        }
        return json.dumps({"token": token})

    def sign(self, access: list[dict[str, object]]) -> str:
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
            capture_output=True,
            check=True,
            timeout=10,
        ).stdout
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        claims = {
            "iss": self.issuer,
            "sub": "",  # anonymous
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        signing_input = f"{_b64(json.dumps(header))}.{_b64(json.dumps(claims))}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            capture_output=True,
            check=True,
            timeout=10,
        ).stdout
        return f"{signing_input}.{_b64(signature)}"


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _access(scopes: list[str]) -> list[dict[str, object]]:
    """Grant every requested `repository:NAME:ACTIONS` scope (anonymous, like a public repo)."""
    granted: list[dict[str, object]] = []
    for scope in scopes:
        for one in scope.split(" "):
            kind, _, rest = one.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and name:
                granted.append({"type": kind, "name": name, "actions": actions.split(",")})
    return granted


@contextmanager
def running_token_server(workdir: Path) -> Iterator[TokenServer]:
    workdir.mkdir(parents=True, exist_ok=True)
    server_state = TokenServer(workdir, requests=[])
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=pin-test-token", "-keyout", str(server_state.key),
         "-out", str(server_state.cert)],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            query = urllib.parse.urlsplit(self.path).query
            assert server_state.requests is not None
            server_state.requests.append(query)
            scopes = urllib.parse.parse_qs(query).get("scope", [])
            token = server_state.sign(_access(scopes))
            body = json.dumps({"token": token, "expires_in": 300}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet test output

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_state.port = int(httpd.server_address[1])
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield server_state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
