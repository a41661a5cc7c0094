"""Brings a RehearsalPlan up in network namespaces, watches it, and tears it down.

Every process is a foreground child (scripts/rehearsal/netns.py records it in the state
file before it runs), every wait has a deadline, and teardown runs in `finally` blocks:
whatever happens, `teardown` (or `python -m scripts.rehearse down` after a crash) removes
every namespace, process and file the rehearsal made.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from scripts.engine import launch
from scripts.rehearsal import netns
from scripts.rehearsal.plan import (
    NGINX_USER,
    PROCESS_PATH,
    STAGES,
    Endpoint,
    Layout,
    ProcessSpec,
    Ready,
    RehearsalPlan,
    RunSecrets,
)

POLL_S: Final = 0.1
CHRONY_POLL_S: Final = 0.5
# After a first process dies, how long to wait for others to die too: a worker that
# cannot join and the leader that waited for it should both be reported.
FAILURE_SETTLE_S: Final = 2.0
LOG_TAIL_LINES: Final = 5
SUPERVISOR_FILE: Final = "supervisor.json"
ENGINES_FILE: Final = "engines.json"  # per engine: seconds to ready, RSS (the tests read it)
SHM_FILE: Final = "shm-before.json"  # /dev/shm names before the engines started
# The real engines of one rehearsal must fit in this together (docs/rehearsal.md).
ENGINE_RSS_BUDGET: Final = 8 * 10**9
GIB: Final = 2**30
TCP_LISTEN: Final = "0A"
TCP_ESTABLISHED: Final = "01"
HTTP_CHECK_TIMEOUT_S: Final = 5.0
PROGRAMS: Final = (
    "ip",
    "setpriv",
    "curl",
    "python3",
    "chronyd",
    "chronyc",
    "nginx",
    "redis-server",
    "prometheus",
    "prometheus-nginx-exporter",
    "prometheus-redis-exporter",
    "prometheus-node-exporter",
    "nft",
)
NFT_TIMEOUT_S: Final = 30.0


class RehearsalFailed(RuntimeError):
    """The rehearsal could not come up (or went down); the message says which process and why."""


@dataclass
class Progress:
    """One line per host/process on `out`, each stamped with the time since the start."""

    out: TextIO
    started: float

    def line(self, host: str, what: str, status: str) -> None:
        elapsed = time.monotonic() - self.started
        self.out.write(f"[{elapsed:5.1f}s] {host:<24} {what:<26} {status}\n")
        self.out.flush()

    def header(self, text: str) -> None:
        self.out.write(f"==> {text}\n")
        self.out.flush()


# --------------------------------------------------------------------------- preflight


def require_root() -> None:
    if os.geteuid() != 0:
        raise RehearsalFailed("the rehearsal needs root (network namespaces, ip netns exec)")


def preflight(state_dir: Path) -> None:
    """Root, the programs of the Debian packages, a state directory nginx's user can reach."""
    require_root()
    missing = [p for p in PROGRAMS if shutil.which(p, path=PROCESS_PATH) is None]
    if missing:
        raise RehearsalFailed(
            f"missing programs: {', '.join(missing)} (install the packages with `make debs`)"
        )
    existing = next(p for p in (state_dir, *state_dir.parents) if p.exists())
    closed = [p for p in (existing, *existing.parents) if not p.stat().st_mode & 0o001]
    if closed:
        raise RehearsalFailed(
            f"nginx runs unprivileged ({NGINX_USER}, as in the gateway pod) and cannot reach "
            f"--state-dir {state_dir}: {closed[0]} is not searchable by others (chmod o+x, "
            "or pick another directory)"
        )


def check_namespaces_free(plan: RehearsalPlan) -> None:
    """Refuse to start when a namespace of the plan exists: teardown would remove it."""
    wanted = {plan.network.bridge_netns, *(h.netns for h in plan.network.hosts)}
    taken = sorted(wanted & set(netns.list_namespaces()))
    if taken:
        raise RehearsalFailed(
            f"namespaces {', '.join(taken)} already exist: another rehearsal uses run id "
            f"{plan.run!r} (stop it with `rehearse.py down --state-dir <its dir>`, or pick "
            "another --run)"
        )


# --------------------------------------------------------------------------- bring-up


def bring_up(
    plan: RehearsalPlan,
    secrets_: RunSecrets,
    state: netns.State,
    progress: Progress,
    *,
    timeout: float,
) -> None:
    """Create the namespaces, write every file, start every process stage by stage and
    wait (at most `timeout` per stage) until each is ready and every clock is synchronised."""
    layout = Layout(state.path.parent)
    state.record_file(layout.secrets)
    _write_json(layout.secrets, secrets_.as_json(), mode=0o600)
    progress.header(f"network: {len(plan.hosts)} hosts on a bridge in {plan.network.bridge_netns}")
    netns.create_network(state, plan.network)
    for host in plan.network.hosts:
        progress.line(host.netns, str(host.address), " ".join(host.names))
    _write_files(plan)
    load_firewall(plan, progress)
    record_shm(layout, state)
    for index, stage in enumerate(STAGES):
        procs = [p for p in plan.processes if p.stage == index]
        if procs:
            progress.header(f"stage {index + 1}/{len(STAGES)}: {stage}")
            ready_s = _run_stage(plan, state, procs, progress, timeout)
            engines = [p for p in procs if p.pod is not None]
            if engines:
                report_engines(layout, state, engines, ready_s, progress)
    progress.header("clocks: every node's chronyd synchronised to the time server")
    wait_for_clocks(plan, state, progress, timeout)
    state.record_file(layout.inventory)
    _write_json(layout.inventory, dict(plan.inventory), mode=0o600)


def _write_files(plan: RehearsalPlan) -> None:
    for directory, owner in plan.directories:
        directory.mkdir(parents=True, exist_ok=True)
        if owner is not None:
            chown_to(directory, owner)
    for spec in plan.files:
        spec.path.parent.mkdir(parents=True, exist_ok=True)
        spec.path.write_text(spec.text, encoding="utf-8")
        spec.path.chmod(spec.mode)
        if spec.owner is not None:
            chown_to(spec.path, spec.owner)


def load_firewall(plan: RehearsalPlan, progress: Progress) -> None:
    """Load each pod host's nftables script before any process starts, so that everything runs
    under the stack's NetworkPolicies from the first packet. A table lives in its namespace and
    goes with it at teardown."""
    if not plan.firewall:
        return
    progress.header(
        f"firewall: the stack's NetworkPolicies as nftables in {len(plan.firewall)} hosts"
    )
    for role, script in plan.firewall:
        where = plan.netns(role)
        try:
            done = netns.run_in(where, ["nft", "-f", str(script)], timeout=NFT_TIMEOUT_S)
            error = done.stderr.strip() if done.returncode else ""
        except subprocess.TimeoutExpired:
            error = f"no answer within {NFT_TIMEOUT_S:g} s"
        if error:
            raise RehearsalFailed(f"nft -f {script} in {where}: {error}")
        rules = sum(" accept" in line for line in script.read_text().splitlines())
        progress.line(role, "nftables", f"loaded: {rules} accept rules, all else dropped")


def chown_to(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def _write_json(path: Path, data: dict[str, Any], *, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _start(plan: RehearsalPlan, state: netns.State, spec: ProcessSpec) -> subprocess.Popen[bytes]:
    if spec.log_owner is not None:
        log = netns.log_dir(state) / f"{spec.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.touch()
        chown_to(log, spec.log_owner)
    return netns.start_process(
        state, plan.netns(spec.host), list(spec.argv), name=spec.name, env=spec.env
    )


def _run_stage(
    plan: RehearsalPlan,
    state: netns.State,
    procs: Sequence[ProcessSpec],
    progress: Progress,
    timeout: float,
) -> dict[str, float]:
    """Start `procs` and wait until each is ready; seconds from its start to ready, by name."""
    t0 = time.monotonic()
    started = {spec.name: _start(plan, state, spec) for spec in procs}
    for spec in procs:
        if spec.note:
            progress.line(spec.host, spec.program, f"started  [{spec.note}]")
    pending = list(procs)
    ready_s: dict[str, float] = {}
    while pending:
        died = [s for s in procs if started[s.name].poll() is not None]
        if died:
            raise RehearsalFailed(_failure_report(state, procs, started))
        for spec in list(pending):
            if _is_ready(plan, spec, started[spec.name].pid):
                pending.remove(spec)
                ready_s[spec.name] = time.monotonic() - t0
                text = _ready_text(spec)
                if spec.pod is not None:
                    text += f"  (in {ready_s[spec.name]:.1f} s)"
                progress.line(spec.host, spec.program, text)
        now = time.monotonic()
        late = [s for s in pending if now - t0 >= (s.ready_timeout or timeout)]
        if late:
            raise RehearsalFailed(_timeout_report(state, late, late[0].ready_timeout or timeout))
        time.sleep(POLL_S)
    return ready_s


# --------------------------------------------------------------------------- engines


def report_engines(
    layout: Layout,
    state: netns.State,
    engines: Sequence[ProcessSpec],
    ready_s: dict[str, float],
    progress: Progress,
) -> None:
    """Print (and write to engines.json) each engine's time to ready and RSS, and the total.

    A worker counts as ready when its group's leader is (the group forms as one server)."""
    pids = {r.name: r.pid for r in state.processes}
    # Leaders listen; a worker's pod name is its leader's plus `-<rank>`.
    leaders = {spec.pod: ready_s[spec.name] for spec in engines if spec.ready.tcp}
    stats: dict[str, dict[str, Any]] = {}
    for spec in engines:
        pod = spec.pod or spec.name
        group_ready = leaders.get(pod, leaders.get(pod.rsplit("-", 1)[0], ready_s[spec.name]))
        rss = launch.group_rss_bytes(pids[spec.name])  # each rehearsal process leads a group
        stats[pod] = {
            "program": spec.program,
            "ready_s": round(max(group_ready, ready_s[spec.name]), 1),
            "rss_bytes": rss,
        }
        progress.line(
            spec.host,
            spec.program,
            f"time to ready {stats[pod]['ready_s']:.1f} s, RSS {rss / GIB:.2f} GiB",
        )
    total = sum(s["rss_bytes"] for s in stats.values())
    verdict = "within" if total <= ENGINE_RSS_BUDGET else "OVER"
    progress.line(
        "engines",
        f"{len(stats)} engine processes",
        f"RSS {total / GIB:.2f} GiB together ({verdict} the {ENGINE_RSS_BUDGET / 1e9:g} GB budget)",
    )
    path = layout.state_dir / ENGINES_FILE
    state.record_file(path)
    _write_json(path, {"engines": stats, "total_rss_bytes": total}, mode=0o644)


def record_shm(layout: Layout, state: netns.State) -> None:
    """Remember /dev/shm before any engine runs: teardown removes what appeared since."""
    path = layout.state_dir / SHM_FILE
    state.record_file(path)
    _write_json(path, {"before": sorted(launch.shm_files())}, mode=0o644)


def shm_before(layout: Layout) -> frozenset[str] | None:
    """The /dev/shm names recorded before the engines started (None: none recorded)."""
    try:
        return frozenset(json.loads((layout.state_dir / SHM_FILE).read_text())["before"])
    except (OSError, ValueError, KeyError):
        return None


def _ready_text(spec: ProcessSpec) -> str:
    ports = [f"tcp :{p}" for p in spec.ready.tcp] + [f"udp :{p}" for p in spec.ready.udp]
    if spec.ready.connects:
        ports.append(f"joined its leader (:{spec.ready.connects})")
    text = "ready " + " ".join(ports) if ports else "running"
    return f"{text}  [{spec.note}]" if spec.note else text


def _is_ready(plan: RehearsalPlan, spec: ProcessSpec, pid: int) -> bool:
    ready = spec.ready
    if ready.tcp and not set(ready.tcp) <= sockets(pid, "tcp", TCP_LISTEN):
        return False
    if ready.udp and not set(ready.udp) <= sockets(pid, "udp", None):
        return False
    if ready.connects and ready.connects not in remote_ports(pid, TCP_ESTABLISHED):
        return False
    return ready.http is None or http_ok(plan.netns(spec.host), ready.http)


def http_ok(netns_: str, url: str) -> bool:
    try:
        result = netns.run_in(
            netns_,
            ["curl", "-sf", "-o", "/dev/null", "--max-time", "2", url],
            timeout=HTTP_CHECK_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


# --------------------------------------------------------------------------- /proc/<pid>/net


def _socket_rows(pid: int, proto: str) -> Iterable[list[str]]:
    """Rows of /proc/<pid>/net/<proto>{,6}: the sockets of the namespace `pid` lives in."""
    for name in (proto, f"{proto}6"):
        with contextlib.suppress(OSError):
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
            yield from (line.split() for line in lines)


def sockets(pid: int, proto: str, state: str | None) -> set[int]:
    """Local ports of the namespace's `proto` sockets (in TCP `state` when given)."""
    return {
        int(row[1].rsplit(":", 1)[1], 16)
        for row in _socket_rows(pid, proto)
        if state is None or row[3] == state
    }


def remote_ports(pid: int, state: str) -> set[int]:
    return {
        int(row[2].rsplit(":", 1)[1], 16) for row in _socket_rows(pid, "tcp") if row[3] == state
    }


# --------------------------------------------------------------------------- failures


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def exit_text(code: int) -> str:
    """`exited with status 1`, or `was killed by SIGKILL` for a negative Popen returncode."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _describe(spec: ProcessSpec) -> str:
    if spec.pod is not None:
        return f"pod {spec.pod} ({spec.program})"
    return f"{spec.program} on {spec.host}"


def _failure_report(
    state: netns.State,
    procs: Sequence[ProcessSpec],
    started: dict[str, subprocess.Popen[bytes]],
) -> str:
    settle = time.monotonic() + FAILURE_SETTLE_S
    while time.monotonic() < settle and not all(started[s.name].poll() is not None for s in procs):
        time.sleep(POLL_S)
    lines: list[str] = []
    for spec in procs:
        code = started[spec.name].poll()
        if code is None:
            continue
        log = netns.log_dir(state) / f"{spec.name}.log"
        tail = log_tail(log)
        errors = [line for line in tail if "ERROR" in line or "error" in line.lower()]
        reason = (errors or tail or ["(no output)"])[-1]
        lines.append(f"{_describe(spec)} {exit_text(code)}: {reason}")
        lines.append(f"    log: {log}")
    return "\n".join(lines)


def _timeout_report(state: netns.State, pending: Sequence[ProcessSpec], timeout: float) -> str:
    lines = []
    for spec in pending:
        log = netns.log_dir(state) / f"{spec.name}.log"
        lines.append(
            f"{_describe(spec)} was not ready within {timeout:g} s "
            f"(waiting for {_wanted(spec.ready)}); last output:"
        )
        lines += [f"    {line}" for line in log_tail(log)] or ["    (no output)"]
        lines.append(f"    log: {log}")
    return "\n".join(lines)


def _wanted(ready: Ready) -> str:
    parts = [f"tcp :{p} listening" for p in ready.tcp] + [f"udp :{p} bound" for p in ready.udp]
    if ready.connects:
        parts.append(f"a connection to :{ready.connects}")
    if ready.http:
        parts.append(f"GET {ready.http}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- clocks


def chrony_synchronised(netns_: str) -> str | None:
    """The selected source when chronyd in `netns_` is synchronised to it, else None."""
    chronyc = ["chronyc", "-h", "127.0.0.1", "-n"]
    try:
        tracking = netns.run_in(netns_, [*chronyc, "tracking"], timeout=5)
        sources = netns.run_in(netns_, [*chronyc, "sources"], timeout=5)
    except subprocess.TimeoutExpired:
        return None
    normal = any(
        line.split(":", 1)[0].strip() == "Leap status" and line.split(":", 1)[1].strip() == "Normal"
        for line in tracking.stdout.splitlines()
    )
    selected = [line.split()[1] for line in sources.stdout.splitlines() if line[1:2] == "*"]
    return selected[0] if normal and selected else None


def wait_for_clocks(
    plan: RehearsalPlan, state: netns.State, progress: Progress, timeout: float
) -> None:
    nodes = [h.role for h in plan.hosts if h.node]
    deadline = time.monotonic() + timeout
    while nodes:
        for role in list(nodes):
            source = chrony_synchronised(plan.netns(role))
            if source is not None:
                nodes.remove(role)
                progress.line(role, "chronyd", f"synchronised to {source}")
        if not nodes:
            return
        check_alive(state)
        if time.monotonic() >= deadline:
            raise RehearsalFailed(
                f"chronyd on {', '.join(nodes)} not synchronised within {timeout:g} s "
                "(see `chronyc -h 127.0.0.1 sources` inside their namespaces)"
            )
        time.sleep(CHRONY_POLL_S)


# --------------------------------------------------------------------------- supervision


def check_alive(state: netns.State) -> None:
    """Raise RehearsalFailed naming every recorded process that has exited."""
    dead = []
    for record in state.processes:
        child = state.children.get(record.pid)
        code = child.poll() if child is not None else None
        if child is not None and code is not None:
            reason = (log_tail(Path(record.log), 1) or ["(no output)"])[-1]
            dead.append(f"{record.name} (pid {record.pid}) {exit_text(code)}: {reason}")
    if dead:
        raise RehearsalFailed("\n".join(dead))


def supervise(state: netns.State, stop: Callable[[], bool], interval: float = 1.0) -> None:
    """Until `stop()`: check every second that every process still runs."""
    while not stop():
        check_alive(state)
        time.sleep(interval)


def write_supervisor(layout: Layout, state: netns.State) -> None:
    pid = os.getpid()
    path = layout.state_dir / SUPERVISOR_FILE
    state.record_file(path)
    _write_json(path, {"pid": pid, "start_ticks": netns.start_ticks(pid)}, mode=0o644)


def supervisor_pid(layout: Layout) -> int | None:
    """The pid of the rehearsal process that owns `layout`, if it still runs."""
    try:
        data = json.loads((layout.state_dir / SUPERVISOR_FILE).read_text())
    except (OSError, ValueError):
        return None
    pid = int(data["pid"])
    return pid if netns.start_ticks(pid) == data["start_ticks"] else None


def stop_supervisor(layout: Layout, timeout: float) -> bool:
    """SIGTERM the owning process and wait for it to tear down; False if it did not exit."""
    pid = supervisor_pid(layout)
    if pid is None or pid == os.getpid():
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # ours when we are its parent or subreaper
        if netns.start_ticks(pid) is None:
            return True
        time.sleep(POLL_S)
    return False


# --------------------------------------------------------------------------- teardown


def supervisor_log(state: netns.State) -> Path:
    """Where a detached rehearsal writes what it would have printed."""
    return netns.log_dir(state) / "supervisor.log"


def teardown(layout: Layout, state: netns.State, *, keep_logs: bool = False) -> list[str]:
    """Remove every namespace, process and file of the rehearsal; what could not be removed.

    With `keep_logs` (a failed run) the process logs and a detached run's own log stay."""
    if not keep_logs:
        supervisor_log(state).unlink(missing_ok=True)
    before = shm_before(layout)
    problems = netns.teardown(state, keep_logs=keep_logs)
    if before is not None:
        # What killed engines leave behind (torch `psm_*`, `sem.mp-*`): files that appeared
        # while the rehearsal ran and that no live process holds.
        launch.remove_leftover_shm(before)
    if not problems:
        shutil.rmtree(layout.hosts, ignore_errors=True)
        for name in (SUPERVISOR_FILE, ENGINES_FILE, SHM_FILE):
            (layout.state_dir / name).unlink(missing_ok=True)
        for path in (layout.secrets, layout.inventory):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            layout.state_dir.rmdir()  # only when empty: kept logs stay with their directory
    return problems


# --------------------------------------------------------------------------- endpoints


def endpoint_table(endpoints: Sequence[Endpoint], key_id: str, key: str) -> str:
    """The endpoints, this run's gateway API key, and how to reach them from a shell."""
    rows = [(e.what, e.address, e.example) for e in endpoints]
    rows.insert(1, (f"API key ({key_id})", key, ""))
    width = max(len(what) for what, _, _ in rows)
    lines = ["Endpoints (inside the rehearsal's namespaces; reach them with ip netns exec):"]
    for what, address, example in rows:
        lines.append(f"  {what:<{width}}  {address}")
        if example:
            lines.append(f"  {'':<{width}}    $ {example}")
    return "\n".join(lines) + "\n"
