"""Simulated hosts for the rehearsal: network namespaces on a private bridge, with hosts files.

Every host is a network namespace named `qvr-<run>-<role>` with one veth (`eth0`) whose
peer is enslaved to a bridge that lives in a namespace of its own (`qvr-<run>-br`), so
nothing is added to the machine's root namespace. Addresses come from a private /24
(10.231.0.0/24) and no namespace has a default route: traffic can only go between the
rehearsal's namespaces. Names resolve through `/etc/netns/<ns>/hosts`, which
`ip netns exec` bind-mounts over /etc/hosts (and an empty resolv.conf, so no DNS query
leaves a namespace).

Every namespace, /etc/netns directory and file is recorded in a JSON state file BEFORE it
is created, and every process right after it starts (its pid is known only then; one
started in a recorded namespace is killed through `ip netns pids` anyway), so
`teardown(State.load(path))` removes it all even after a crash of the process that
built it. Teardown only ever touches names with the `qvr-` prefix and files under the
state file's directory.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

PREFIX = "qvr-"
SUBNET = ipaddress.IPv4Network("10.231.0.0/24")
NETNS_ETC = Path("/etc/netns")
BRIDGE = "br0"
HOST_IFACE = "eth0"
IP_TIMEOUT_S = 15.0
STATE_VERSION = 1
_NETNS_RE = re.compile(r"^qvr-[a-z0-9]+(-[a-z0-9]+)*$")
_PART_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
MAX_NETNS_LEN = 64
RESOLV_CONF = (
    "# Written by the qwen-vl-serving rehearsal: no DNS inside the rehearsal, names come\n"
    "# from this namespace's hosts file. Without a nameserver line glibc asks 127.0.0.1,\n"
    "# which is this namespace's own loopback.\n"
    "options timeout:1 attempts:1\n"
)


class NetnsError(RuntimeError):
    """An `ip` command failed, or a name is not one the rehearsal may create."""


# --------------------------------------------------------------------------- pure helpers


@dataclass(frozen=True)
class HostSpec:
    """One simulated host: its namespace, its address on the bridge, the names it answers to."""

    netns: str
    address: ipaddress.IPv4Address
    names: tuple[str, ...]


@dataclass(frozen=True)
class Network:
    """The planned rehearsal network (pure data; `create_network` builds it)."""

    run: str
    bridge_netns: str
    subnet: ipaddress.IPv4Network
    hosts: tuple[HostSpec, ...]

    def host(self, netns: str) -> HostSpec:
        for host in self.hosts:
            if host.netns == netns:
                return host
        raise KeyError(netns)

    def hosts_file(self) -> str:
        return render_hosts_file(self.hosts)


def netns_name(run: str, role: str) -> str:
    """`qvr-<run>-<role>`; both parts lower-case letters, digits and single dashes."""
    for label, value in (("run", run), ("role", role)):
        if not _PART_RE.match(value):
            raise NetnsError(f"{label} {value!r} must be lower-case letters, digits and dashes")
    name = f"{PREFIX}{run}-{role}"
    if len(name) > MAX_NETNS_LEN:
        raise NetnsError(f"namespace name {name!r} is longer than {MAX_NETNS_LEN} characters")
    return name


def plan_network(
    run: str,
    hosts: Sequence[tuple[str, Sequence[str]]],
    subnet: ipaddress.IPv4Network = SUBNET,
) -> Network:
    """Namespaces and addresses for `hosts` ((role, host names) pairs), in order from .1."""
    addresses = subnet.hosts()
    specs: list[HostSpec] = []
    seen: dict[str, str] = {}
    for role, names in hosts:
        netns = netns_name(run, role)
        if netns in (spec.netns for spec in specs):
            raise NetnsError(f"role {role!r} is listed twice")
        for name in names:
            if name in seen:
                raise NetnsError(f"host name {name!r} is claimed by {seen[name]} and {role}")
            seen[name] = role
        address = next(addresses, None)
        if address is None:
            raise NetnsError(f"{subnet} has no address left for {role!r}")
        specs.append(HostSpec(netns=netns, address=address, names=tuple(names)))
    return Network(run=run, bridge_netns=netns_name(run, "br"), subnet=subnet, hosts=tuple(specs))


def render_hosts_file(hosts: Iterable[HostSpec]) -> str:
    lines = [
        "# Written by the qwen-vl-serving rehearsal (scripts/rehearsal/netns.py).",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
    ]
    lines += [f"{host.address}\t{' '.join(host.names)}" for host in hosts if host.names]
    return "\n".join(lines) + "\n"


def veth_name(index: int) -> str:
    """Bridge-side end of host `index`'s veth (inside the bridge namespace; <= 15 chars)."""
    return f"h{index}"


# --------------------------------------------------------------------------- state


@dataclass
class ProcessRecord:
    name: str
    netns: str
    pid: int
    start_ticks: int  # /proc/<pid>/stat start time: tells our process from a reused pid
    argv: list[str]
    log: str


@dataclass
class State:
    """What the rehearsal created, saved to `path` before each thing is created."""

    path: Path
    namespaces: list[str] = field(default_factory=list)
    etc_dirs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    processes: list[ProcessRecord] = field(default_factory=list)
    created_etc_root: bool = False
    # Popen objects of processes this Python process started (not persisted): waiting on
    # them reaps the children, which PID 1 on this machine does not do for orphans.
    children: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: Path) -> State:
        if not path.exists():
            return cls(path=path)
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != STATE_VERSION:
            raise NetnsError(f"{path}: unknown state version {data.get('version')!r}")
        return cls(
            path=path,
            namespaces=list(data["namespaces"]),
            etc_dirs=list(data["etc_dirs"]),
            files=list(data["files"]),
            processes=[ProcessRecord(**p) for p in data["processes"]],
            created_etc_root=bool(data["created_etc_root"]),
        )

    def save(self) -> None:
        data = {
            "version": STATE_VERSION,
            "namespaces": self.namespaces,
            "etc_dirs": self.etc_dirs,
            "files": self.files,
            "processes": [asdict(p) for p in self.processes],
            "created_etc_root": self.created_etc_root,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.path)  # atomic: a crash never leaves a half-written state file

    def record_namespace(self, netns: str) -> None:
        _check_netns(netns)
        if netns not in self.namespaces:
            self.namespaces.append(netns)
            self.save()

    def record_file(self, path: Path) -> None:
        if str(path) not in self.files:
            self.files.append(str(path))
            self.save()


def _check_netns(netns: str) -> None:
    if not _NETNS_RE.match(netns) or len(netns) > MAX_NETNS_LEN:
        raise NetnsError(f"{netns!r} is not a rehearsal namespace name ({PREFIX}...)")


# --------------------------------------------------------------------------- runners


def ip(*args: str) -> str:
    """Run `ip ARGS`; its stdout, or NetnsError naming the command and ip's message."""
    try:
        result = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise NetnsError("`ip` is not on PATH: install iproute2 (`make debs`)") from None
    except subprocess.TimeoutExpired as err:
        raise NetnsError(f"`ip {' '.join(args)}` did not finish in {IP_TIMEOUT_S:g} s") from err
    if result.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result.stdout


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    """Names from `ip netns list` that start with `prefix`."""
    names = [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]
    return [name for name in names if name.startswith(prefix)]


def create_network(state: State, network: Network) -> None:
    """Create the bridge namespace, one namespace per host on it, and their hosts files."""
    bridge = network.bridge_netns
    _add_namespace(state, bridge)
    ip("-n", bridge, "link", "add", BRIDGE, "type", "bridge")
    ip("-n", bridge, "link", "set", BRIDGE, "up")
    hosts_file = network.hosts_file()
    for index, host in enumerate(network.hosts):
        _add_namespace(state, host.netns)
        veth = veth_name(index)
        ip(
            "-n",
            bridge,
            "link",
            "add",
            veth,
            "type",
            "veth",
            "peer",
            "name",
            HOST_IFACE,
            "netns",
            host.netns,
        )
        ip("-n", bridge, "link", "set", veth, "master", BRIDGE, "up")
        prefix_len = str(network.subnet.prefixlen)
        ip("-n", host.netns, "addr", "add", f"{host.address}/{prefix_len}", "dev", HOST_IFACE)
        ip("-n", host.netns, "link", "set", HOST_IFACE, "up")
        write_etc_file(state, host.netns, "hosts", hosts_file)
        write_etc_file(state, host.netns, "resolv.conf", RESOLV_CONF)


def _add_namespace(state: State, netns: str) -> None:
    state.record_namespace(netns)
    ip("netns", "add", netns)
    ip("-n", netns, "link", "set", "lo", "up")


def write_etc_file(state: State, netns: str, name: str, text: str) -> Path:
    """Write /etc/netns/<netns>/<name>, which `ip netns exec` shows as /etc/<name>."""
    _check_netns(netns)
    directory = NETNS_ETC / netns
    if not NETNS_ETC.exists():
        state.created_etc_root = True
    if str(directory) not in state.etc_dirs:
        state.etc_dirs.append(str(directory))
    state.save()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def log_dir(state: State) -> Path:
    """Where `start_process` writes logs: beside the state file, so teardown may remove them."""
    return state.path.parent / "logs"


def start_process(
    state: State,
    netns: str,
    argv: Sequence[str],
    *,
    name: str,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` inside `netns` as a foreground child in its own process group.

    stdout and stderr both go to `log_dir(state)/<name>.log`. The caller (or `teardown`)
    must end it; `state` records it so a later teardown can, even after a crash.
    """
    _check_netns(netns)
    log_path = log_dir(state) / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    state.record_file(log_path)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            start_new_session=True,  # its own process group, so teardown reaches its children
        )
    state.children[proc.pid] = proc
    record = ProcessRecord(
        name=name,
        netns=netns,
        pid=proc.pid,
        start_ticks=start_ticks(proc.pid) or 0,
        argv=list(argv),
        log=str(log_path),
    )
    state.processes.append(record)
    state.save()
    return proc


def run_in(
    netns: str, argv: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short command inside `netns` and wait for it (bounded by `timeout`)."""
    _check_netns(netns)
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else dict(env),
        check=False,
    )


# --------------------------------------------------------------------------- teardown


def teardown(state: State, *, grace: float = 5.0, keep_logs: bool = False) -> list[str]:
    """Stop every recorded process, delete namespaces, /etc/netns dirs and files.

    Returns what could not be removed (empty when everything is gone, in which case
    the state file is deleted too). Safe to call again after a partial failure.
    """
    problems: list[str] = []
    _stop_processes(state, grace, problems)
    for netns in reversed(state.namespaces):
        _remove_namespace(netns, problems)
    for record in state.processes:
        _reap(state, record.pid)  # those `_remove_namespace` had to SIGKILL
    for directory in state.etc_dirs:
        _remove_etc_dir(Path(directory), problems)
    if state.created_etc_root:
        with contextlib.suppress(OSError):
            NETNS_ETC.rmdir()  # only if empty: another tool may have put something there
    logs = {p.log for p in state.processes}
    for name in state.files:
        if not (keep_logs and name in logs):
            _remove_file(state, Path(name), problems)
    with contextlib.suppress(OSError):
        log_dir(state).rmdir()  # only if empty
    problems += leftovers(state)
    if not problems:
        state.path.unlink(missing_ok=True)
    return problems


def leftovers(state: State) -> list[str]:
    """Recorded namespaces, /etc/netns dirs and processes that still exist."""
    found: list[str] = []
    existing = set(list_namespaces())
    found += [f"namespace {ns} still exists" for ns in state.namespaces if ns in existing]
    found += [f"{d} still exists" for d in state.etc_dirs if Path(d).exists()]
    found += [
        f"process {p.name} (pid {p.pid}) is still running" for p in state.processes if is_running(p)
    ]
    return found


def _stop_processes(state: State, grace: float, problems: list[str]) -> None:
    live = [p for p in state.processes if is_running(p)]
    for record in live:
        _signal_group(record.pid, signal.SIGTERM)
    live = _wait_gone(state, live, grace)
    for record in live:
        _signal_group(record.pid, signal.SIGKILL)
    live = _wait_gone(state, live, grace)
    problems += [f"process {p.name} (pid {p.pid}) survived SIGKILL" for p in live]
    for record in state.processes:
        _reap(state, record.pid)


def _signal_group(pid: int, signum: signal.Signals) -> None:
    # start_process gave each process its own session, so its pid is its group id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)


def _wait_gone(state: State, records: list[ProcessRecord], timeout: float) -> list[ProcessRecord]:
    deadline = time.monotonic() + timeout
    while True:
        for record in records:
            _reap(state, record.pid)
        records = [r for r in records if is_running(r)]
        if not records or time.monotonic() >= deadline:
            return records
        time.sleep(0.05)


def _reap(state: State, pid: int) -> None:
    """Collect a dead child's exit status so it does not linger as a zombie."""
    child = state.children.get(pid)
    if child is not None:
        child.poll()
        return
    # Not started by this process object: a child adopted as subreaper, or not ours.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def is_running(record: ProcessRecord) -> bool:
    """Alive, not a zombie, and the same process (start time) as the one recorded."""
    ticks = start_ticks(record.pid)
    # start_ticks 0: it had already exited when recorded
    return ticks is not None and record.start_ticks in (0, ticks)


def start_ticks(pid: int) -> int | None:
    """When process `pid` started (/proc/<pid>/stat field 22: tells it from a later process
    with the same pid); None when there is no such process or it is a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # from field 3 (state) on
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _remove_namespace(netns: str, problems: list[str]) -> None:
    if not _NETNS_RE.match(netns):
        problems.append(f"refusing to touch namespace {netns!r}: not a {PREFIX} name")
        return
    try:
        if netns not in list_namespaces():
            return
        for pid in ip("netns", "pids", netns).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)  # a process started in our namespace
        ip("netns", "del", netns)
    except NetnsError as err:
        problems.append(str(err))


def _remove_etc_dir(directory: Path, problems: list[str]) -> None:
    if directory.parent != NETNS_ETC or not _NETNS_RE.match(directory.name):
        problems.append(f"refusing to remove {directory}: not {NETNS_ETC}/{PREFIX}*")
        return
    try:
        shutil.rmtree(directory)
    except FileNotFoundError:
        pass
    except OSError as err:
        problems.append(f"cannot remove {directory}: {err}")


def _remove_file(state: State, path: Path, problems: list[str]) -> None:
    root = state.path.parent.resolve()
    if not path.resolve().is_relative_to(root):
        problems.append(f"refusing to remove {path}: outside {root}")
        return
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        problems.append(f"cannot remove {path}: {err}")
