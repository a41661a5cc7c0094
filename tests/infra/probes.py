"""Helpers of the role checks: sockets and processes through testinfra, bounded waits, HTTP.

Socket and process checks go through the `host` (testinfra) so they see the host's own
namespace: `host.socket` when the host has `ss` or `netstat`, else /proc/net/tcp read
through the host (minimal container images have neither tool). HTTP checks are made by
this process against a URL that reaches the host from where the suite runs: loopback
inside a rehearsal namespace, a `kubectl port-forward` for pods.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

T = TypeVar("T")
# testinfra's Host builds host.socket, host.file, host.process... at run time
# (Host.__getattr__ is typed as returning a module class), so the checks take it as Any.
InfraHost = Any
HTTP_TIMEOUT_S = 30.0
TCP_LISTEN = "0A"
TCP_ESTABLISHED = "01"


def wait_for(check: Callable[[], T | None], *, timeout: float, interval: float = 1.0) -> T | None:
    """`check()`'s first truthy result within `timeout` seconds (None if there was none)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def client() -> httpx.Client:
    # trust_env=False: no proxy variable may send a rehearsal request off the machine.
    return httpx.Client(timeout=HTTP_TIMEOUT_S, trust_env=False)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --------------------------------------------------------------------------- sockets


@dataclass(frozen=True)
class TcpSocket:
    local: ipaddress.IPv4Address | ipaddress.IPv6Address
    local_port: int
    remote: ipaddress.IPv4Address | ipaddress.IPv6Address
    remote_port: int
    state: str


def _address(hex_address: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """/proc/net/tcp's `0100007F:1F90` (little-endian words) -> (127.0.0.1, 8080)."""
    hex_ip, hex_port = hex_address.split(":")
    raw = bytes.fromhex(hex_ip)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, int(hex_port, 16)


def tcp_sockets(host: InfraHost) -> list[TcpSocket]:
    """Every TCP socket of the host's network namespace, from /proc/net/tcp{,6}."""
    sockets = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        result = host.run("cat %s", name)
        for line in result.stdout.splitlines()[1:]:
            fields = line.split()
            local, local_port = _address(fields[1])
            remote, remote_port = _address(fields[2])
            sockets.append(TcpSocket(local, local_port, remote, remote_port, fields[3]))
    return sockets


def listening(host: InfraHost, port: int, address: str | None = None) -> bool:
    """Whether something listens on TCP `port` at `address` (default: the any-address,
    IPv4 0.0.0.0 or IPv6 ::, i.e. reachable from other hosts)."""
    addresses = [address] if address else ["0.0.0.0", "::"]
    if host.exists("ss") or host.exists("netstat"):
        return any(host.socket(f"tcp://{a}:{port}").is_listening for a in addresses)
    wanted = {ipaddress.ip_address(a) for a in addresses}
    return any(
        s.state == TCP_LISTEN and s.local_port == port and s.local in wanted
        for s in tcp_sockets(host)
    )


def listening_anywhere(host: InfraHost, port: int) -> bool:
    """Whether anything listens on TCP `port`, on any address."""
    return any(s.state == TCP_LISTEN and s.local_port == port for s in tcp_sockets(host))


def established(host: InfraHost) -> list[TcpSocket]:
    return [s for s in tcp_sockets(host) if s.state == TCP_ESTABLISHED]


def resolve(host: InfraHost, name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """`name` as the host resolves it (hosts file in the rehearsal, cluster DNS in pods)."""
    out = host.check_output("getent hosts %s", name)
    return ipaddress.ip_address(out.split()[0])


# --------------------------------------------------------------------------- processes


_NETNS_OF_PIDS = (
    'for p in /proc/[0-9]*; do echo "${p#/proc/} $(readlink "$p/ns/net" 2>/dev/null)"; done'
)
_CMDLINES = (
    'for p in /proc/[0-9]*; do printf "%s " "${p#/proc/}"; '
    "tr '\\0\\n' '  ' < \"$p/cmdline\" 2>/dev/null; echo; done"
)


def host_processes(host: InfraHost) -> list[tuple[int, str]]:
    """(pid, command line) of the processes in the host's own network namespace.

    A rehearsal's namespaces share one process table, and a node's table also holds its
    pods' processes: a process belongs to this host when it shares the host's network
    namespace. Read from /proc rather than testinfra's host.process: its `ps` parsing breaks
    when any process on the machine has a title with spaces (setproctitle, `npm pack ...`).
    """
    me = host.check_output("readlink /proc/self/ns/net")
    netns_of = dict(
        line.split(" ", 1) for line in host.check_output(_NETNS_OF_PIDS).splitlines() if " " in line
    )
    procs = [
        (int(pid), args.strip())
        for pid, _, args in (
            line.partition(" ") for line in host.check_output(_CMDLINES).splitlines()
        )
        if args.strip()
    ]
    return [(pid, args) for pid, args in procs if netns_of.get(str(pid)) == me]


def engine_command(host: InfraHost, model: str) -> list[str]:
    """The argv (split on spaces) of this host's `vllm serve <model>` (empty if not one)."""
    found = [
        args.split()
        for _, args in host_processes(host)
        if " serve " in f" {args} " and model in args.split()
    ]
    return found[0] if len(found) == 1 else []


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def json_of(response: httpx.Response) -> Any:
    assert response.headers.get("content-type", "").startswith("application/json"), response.text
    return response.json()
