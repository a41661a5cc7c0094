"""The rendered nginx.conf of every stack, judged by real nginx binaries.

This module: rendered files checked by the real programs that read them. The other layers' tests
of the same code: tests/unit/test_nginx_conf.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from components.render.gateway_pod import build_start_script
from components.render.nginx_conf import (
    CONF_DIR,
    CONF_FILE,
    RESOLVER_FILE,
    Backend,
    NginxConfArgs,
    build_nginx_conf_args,
    render_nginx_conf,
    render_resolver_conf,
)
from stacks.naming import VLLM_PORT
from stacks.schema import Settings
from stacks.settings import load_stack_file, stack_file
from tests.support.gateway_run import (
    NOBODY,
    SID_NGINX,
    bearer,
    running_gateway,
    schema_defaults,
    scratch_dir,
    scratch_paths,
    stand_ins,
    write_gateway_files,
)
from tests.support.local import free_port
from tests.support.nginx_conf import CHROOT_SCRIPT, RESOLVE_OPEN_SOURCE_SINCE, STACKS

DEFAULT_CHROOT = Path("/var/cache/qwen-vl/nginx-sid")


@pytest.fixture(scope="module", params=STACKS)
def settings(request: pytest.FixtureRequest) -> Settings:
    return load_stack_file(stack_file(request.param))


def static_args(settings: Settings, directory: str) -> NginxConfArgs:
    addresses = {
        d.name: ("127.0.0.1:18001", "127.0.0.1:18002") for d in settings.serving.deployments
    }
    args = build_nginx_conf_args(
        settings, mode="static", static_addresses=addresses, paths=scratch_paths(directory)
    )
    return replace(args, listen="127.0.0.1:18080", status_listen="127.0.0.1:18081")


def nginx_version(command: list[str]) -> tuple[int, ...]:
    out = subprocess.run([*command, "-v"], capture_output=True, text=True, check=True).stderr
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out)
    assert found, out
    return tuple(int(part) for part in found.groups())


def test_unsafe_input_is_refused() -> None:
    args = NginxConfArgs(
        mode="static",
        deployments=(Backend(name="a", addresses=("h:1",)),),
        default_deployment="a",
        **schema_defaults(),
    )
    with pytest.raises(ValueError, match="default deployment 'b'"):
        render_nginx_conf(replace(args, default_deployment="b"))
    with pytest.raises(ValueError, match="not a header name"):
        render_nginx_conf(replace(args, affinity_header="X_Session"))
    with pytest.raises(ValueError, match="at least 1 request per minute"):
        render_nginx_conf(replace(args, requests_per_second=0.001))
    with pytest.raises(ValueError, match="static mode needs the addresses"):
        build_nginx_conf_args(load_stack_file(stack_file("dev")), mode="static")


def host_nginx_t(args: NginxConfArgs, directory: Path) -> subprocess.CompletedProcess[str]:
    """The machine's `nginx -t` on `args`, both Secret includes written where it includes them."""
    conf = write_gateway_files(Path("/"), args)
    return subprocess.run(
        ["nginx", "-t", "-c", str(conf), "-p", f"{directory}/"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (make debs)")
def test_bookworm_nginx_cannot_run_the_routing_tier(settings: Settings) -> None:
    # Why the chroot runs the gateway: bookworm has no njs >= 0.8 (docs/reference/njs.md#versions).
    with scratch_dir() as directory:
        result = host_nginx_t(static_args(settings, str(directory)), directory)
    assert nginx_version(["nginx"])[:2] == (1, 22)
    assert result.returncode == 1
    assert "ngx_http_js_module.so" in result.stderr or 'unknown directive "js_' in result.stderr


def test_static_variant_passes_nginx_t_on_sid_nginx_with_njs(
    sid_chroot: Path, settings: Settings
) -> None:
    with scratch_dir() as directory:
        args = static_args(settings, str(directory))
        conf = write_gateway_files(Path("/"), args)
        result = subprocess.run(
            [str(SID_NGINX), "/tmp", "--", "nginx", "-t", "-c", str(conf), "-p", f"{directory}/"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={**os.environ, "NGINX_CHROOT": str(sid_chroot)},
        )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


@pytest.fixture(scope="session")
def sid_chroot() -> Path:
    """The sid chroot with nginx >= 1.27.3, built by scripts/nginx-chroot.sh when missing."""
    chroot = Path(os.environ.get("NGINX_CHROOT", str(DEFAULT_CHROOT)))
    if os.geteuid() != 0:
        pytest.skip("the sid nginx chroot needs root (debootstrap, chroot, mount namespaces)")
    if shutil.which("debootstrap") is None and not (chroot / "usr/sbin/nginx").exists():
        pytest.skip("debootstrap is not installed (make debs), so no nginx >= 1.27.3 chroot")
    result = subprocess.run(
        ["bash", str(CHROOT_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "NGINX_CHROOT": str(chroot)},
    )
    if result.returncode != 0:
        pytest.skip(
            "cannot build the nginx chroot here: " + (result.stderr or result.stdout)[-500:]
        )
    return chroot


def test_chroot_nginx_has_resolve(sid_chroot: Path) -> None:
    assert nginx_version(["chroot", str(sid_chroot), "nginx"]) >= RESOLVE_OPEN_SOURCE_SINCE


# In a private mount namespace with no network (the shared chroot stays untouched): tmpfs over
# the chroot's /etc/nginx and /run, the pod's resolv.conf over the chroot's, the pod's files
# copied in; then the pod's start script, with a PATH whose `nginx` checks instead of serving.
_POD_START_CHECK = r"""
set -eu
mount -t tmpfs tmpfs "$1/etc/nginx"
mount -t tmpfs tmpfs "$1/run"
mount -t proc proc "$1/proc"
mount --bind "$3" "$1/etc/resolv.conf"
cp -R "$2/." "$1/"
exec chroot "$1" env PATH=/run/test-bin:/usr/sbin:/usr/bin:/bin sh -c "$4"
"""


# The `nginx` the start script execs here: shows the resolver include it was given, then
# runs the real nginx with the script's arguments plus -t.
_NGINX_T_SHIM = '#!/bin/sh\ncat /run/gateway/resolver.conf >&2\nexec /usr/sbin/nginx -t "$@"\n'


@pytest.mark.parametrize(
    ("nameserver", "resolver_line"),
    [
        ("172.20.0.10", "resolver 172.20.0.10 valid=5s ipv6=off;"),
        ("fd00:10:100::a", "resolver [fd00:10:100::a] valid=5s ipv6=off;"),  # an IPv6 cluster
    ],
)
def test_the_pods_start_script_and_config_pass_nginx_t_at_the_pods_paths(
    sid_chroot: Path, settings: Settings, nameserver: str, resolver_line: str
) -> None:
    """The exact ConfigMap text, both Secret includes and the resolver include that the pod's
    own start script writes from its resolv.conf, checked by nginx >= 1.27.3."""
    args = build_nginx_conf_args(settings)
    with scratch_dir() as staging:
        root = staging / "root"
        conf = root / CONF_DIR.lstrip("/") / CONF_FILE
        conf.parent.mkdir(parents=True)
        write_gateway_files(root, args).replace(conf)
        shim = root / "run" / "test-bin" / "nginx"
        shim.parent.mkdir()
        shim.write_text(_NGINX_T_SHIM)
        shim.chmod(0o755)
        resolv = staging / "resolv.conf"
        resolv.write_text(
            "search qwen-vl.svc.cluster.local svc.cluster.local cluster.local\n"
            f"nameserver {nameserver}\noptions ndots:5\n"
        )
        result = subprocess.run(
            [
                "unshare",
                "--mount",
                "--net",
                "--propagation",
                "private",
                "sh",
                "-c",
                _POD_START_CHECK,
                "sh",
                str(sid_chroot),
                str(root),
                str(resolv),
                build_start_script(args),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0] == resolver_line
    assert "file /etc/nginx/gateway/nginx.conf test is successful" in result.stderr


class TinyDns:
    """A loopback DNS server answering A queries from `records` (the test edits it)."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            self.sock.sendto(self.answer(query), peer)

    def answer(self, query: bytes) -> bytes:
        labels, offset = [], 12
        while query[offset]:
            length = query[offset]
            labels.append(query[offset + 1 : offset + 1 + length].decode())
            offset += 1 + length
        qtype = struct.unpack("!H", query[offset + 1 : offset + 3])[0]
        question = query[12 : offset + 5]
        name = ".".join(labels).lower()
        known = name in self.records
        addresses = self.records.get(name, []) if qtype == 1 else []
        flags = 0x8180 if known else 0x8183  # response, recursion; NXDOMAIN when unknown
        header = query[:2] + struct.pack("!HHHHH", flags, 1, len(addresses), 0, 0)
        answers = b"".join(
            struct.pack("!HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(a) for a in addresses
        )
        return header + question + answers


@contextlib.contextmanager
def tiny_dns() -> Iterator[TinyDns]:
    server = TinyDns()
    try:
        yield server
    finally:
        server.close()


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def test_cluster_variant_follows_dns_without_a_reload(sid_chroot: Path) -> None:
    """The leader Service's addresses change (a group restarts elsewhere, KEDA adds one):
    nginx follows without a reload. Sessions live on the leader pods' own names, spread
    evenly, and follow a pod that comes back at a new address."""
    names = ["leader-a", "leader-b", "leader-c", "leader-d"]
    ips = ["127.77.0.2", "127.77.0.3", "127.77.0.4", "127.77.0.5"]
    if not all(_bindable(ip, VLLM_PORT) for ip in ips):
        pytest.skip(f"port {VLLM_PORT} is taken on one of {ips}")
    staging = load_stack_file(stack_file("staging"))  # sessionAffinity on X-Session-Id
    with (
        tiny_dns() as dns,
        stand_ins(names, hosts=ips, port=VLLM_PORT),
        scratch_dir(sid_chroot / "tmp") as directory,
    ):
        args = replace(
            build_nginx_conf_args(staging),
            listen=f"127.0.0.1:{free_port()}",
            paths=scratch_paths("/tmp/" + directory.name),
            burst=1000,  # this test's traffic is not what the rate limit is about
        )
        first = args.deployments[0]
        leader_host = first.addresses[0].rsplit(":", 1)[0]
        assert leader_host == "qwen3-vl-2b-leader.qwen-vl.svc.cluster.local"
        pods = [a.rsplit(":", 1)[0] for a in first.engine_addresses]
        assert pods[0] == "qwen3-vl-2b-0.qwen3-vl-2b.qwen-vl.svc.cluster.local"
        assert 2 <= len(pods) <= len(names)
        dns.records[leader_host] = ips[:1]
        for pod, ip in zip(pods, ips, strict=False):
            dns.records[pod] = [ip]
        runtime = directory / "run"
        runtime.mkdir()
        (runtime / RESOLVER_FILE).write_text(render_resolver_conf("127.0.0.1", dns.port))
        command = ("chroot", f"--userspec={NOBODY}:{NOBODY}", str(sid_chroot), "nginx")
        with (
            running_gateway(args, directory, root=sid_chroot, command=command) as gw,
            httpx.Client(base_url=gw.url, timeout=10) as c,
        ):

            def served_by(session: str | None = None) -> str:
                headers = {**bearer(), **({"X-Session-Id": session} if session else {})}
                body = {"model": first.models[0], "messages": []}
                response = c.post("/v1/chat/completions", json=body, headers=headers)
                return response.json()["upstream"] if response.status_code == 200 else ""

            def spread() -> set[str]:  # no session id: least_conn over the Service's leaders
                return {served_by() for _ in range(12)}

            assert _eventually(lambda: served_by() == "leader-a")
            dns.records[leader_host] = ips[1:]  # a's group moved away; three groups now
            assert _eventually(lambda: spread() == {"leader-b", "leader-c", "leader-d"})
            dns.records[leader_host] = ips  # a fourth group joins
            assert _eventually(lambda: spread() == set(names))
            sessions = [f"conversation-{i}" for i in range(30)]
            placed = [{s: served_by(s) for s in sessions} for _ in range(2)]
            moved = names[0]  # group 0's leader, at ips[0]
            dns.records[pods[0]] = [ips[-1]]  # ... restarts at another address
            witness = next(s for s, engine in placed[0].items() if engine == moved)
            assert _eventually(lambda: served_by(witness) == names[-1])
            after = {s: served_by(s) for s in sessions}
    assert placed[0] == placed[1]  # every turn of a session reaches the same engine
    counts = Counter(placed[0].values())
    assert set(counts) == set(names[: len(pods)])
    assert max(counts.values()) - min(counts.values()) <= 1  # fewest-sessions placement
    # Group 0's sessions now reach its leader at the new address; the others did not move.
    for session, engine in placed[0].items():
        assert after[session] == (names[-1] if engine == moved else engine)


def _eventually(check: Callable[[], bool], seconds: float = 20) -> bool:
    """True once `check()` holds, polling for at most `seconds` (the resolver's valid= is 5 s)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.25)
    return False


def chroot_script(
    chroot: Path, *argv: str, prefix: tuple[str, ...] = (), **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, "bash", str(CHROOT_SCRIPT), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "NGINX_CHROOT": str(chroot), **env},
    )


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 1, result.stderr
    assert "line " not in result.stderr  # no bash error with a line number, only the script's
    return [line for line in result.stderr.splitlines() if line.startswith("nginx-chroot: ")]


def test_chroot_script_refuses_an_unknown_argument(tmp_path: Path) -> None:
    result = chroot_script(tmp_path / "chroot", "--force")
    assert error_lines(result) == ["nginx-chroot: error: unknown argument: --force"]
    assert "Usage: nginx-chroot.sh [--help]" in result.stderr
    assert not (tmp_path / "chroot").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the script as root and as nobody")
def test_chroot_script_names_each_missing_prerequisite(tmp_path: Path) -> None:
    chroot = tmp_path / "chroot"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data").write_text("not a chroot\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    drop = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
    cases = {
        "not root": (chroot_script(chroot, prefix=drop), "needs root (debootstrap and chroot)"),
        "no debootstrap": (
            chroot_script(chroot, PATH="/usr/bin:/bin"),
            "debootstrap is not installed; run 'make debs'",
        ),
        "a foreign directory": (
            chroot_script(foreign),
            f"{foreign} exists, is not empty and was not built by this script",
        ),
        "a file": (chroot_script(a_file), f"{a_file} exists and is not a directory"),
    }
    for case, (result, message) in cases.items():
        lines = error_lines(result)
        assert len(lines) == 1, (case, result.stderr)
        assert lines[0].startswith(f"nginx-chroot: error: {message}"), (case, lines)
    assert (foreign / "data").read_text() == "not a chroot\n"  # left alone
    assert not chroot.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap needs root")
@pytest.mark.skipif(shutil.which("debootstrap") is None, reason="debootstrap is not installed")
def test_chroot_script_reports_an_unreachable_mirror_and_cleans_up(tmp_path: Path) -> None:
    chroot = tmp_path / "chroot"
    # A loopback port nobody listens on: the connection is refused at once.
    mirror = f"http://127.0.0.1:{free_port()}/debian"
    result = chroot_script(chroot, NGINX_CHROOT_MIRROR=mirror)
    assert error_lines(result)[-1] == (
        "nginx-chroot: error: debootstrap failed (exit 1); see its output above"
    )
    assert "E: Failed getting release file" in result.stdout
    assert not chroot.exists()
    assert not (tmp_path / "chroot.partial").exists()
