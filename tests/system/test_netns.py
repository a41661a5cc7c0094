"""Simulated hosts for the rehearsal: network planning (pure) and real namespaces (root).

This module: running processes: servers on loopback and in network namespaces. The other layers'
tests of the same code: tests/unit/test_netns.py.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.rehearsal import netns

ROOT = Path(__file__).resolve().parents[2]


needs_root_and_ip = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2's `ip`"
)


def test_a_missing_ip_is_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(netns.NetnsError, match=re.escape("`ip` is not on PATH: install iproute2")):
        netns.list_namespaces()


def run_tag(letter: str) -> str:
    return f"t{os.getpid()}{letter}"


def ours(run: str) -> tuple[list[str], list[Path]]:
    """This run's namespaces and /etc/netns dirs that still exist.

    Only this run's: a rehearsal of someone else on the machine may own other qvr- names.
    """
    prefix = f"{netns.PREFIX}{run}-"
    return netns.list_namespaces(prefix), sorted(netns.NETNS_ETC.glob(f"{prefix}*"))


@pytest.fixture
def state(tmp_path: Path) -> Iterator[netns.State]:
    """A state file under tmp_path; whatever a test leaves up is torn down afterwards."""
    current = netns.State(path=tmp_path / ".rehearsal" / "state.json")
    yield current
    netns.teardown(netns.State.load(current.path) if current.path.exists() else current)


FETCH = textwrap.dedent(
    """
    import sys, urllib.request
    with urllib.request.urlopen(sys.argv[1], timeout=2) as reply:
        sys.stdout.write(reply.read().decode())
    """
)


@pytest.mark.netns
@needs_root_and_ip
def test_hosts_reach_each_other_by_name_and_teardown_leaves_nothing(
    state: netns.State, tmp_path: Path
) -> None:
    run = run_tag("a")
    net = netns.plan_network(
        run,
        [("web", ["web", "web.serving.svc.cluster.local"]), ("client", ["client"]), ("other", [])],
    )
    web, client, other = net.hosts
    netns.create_network(state, net)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_text("hello from web")
    server = netns.start_process(
        state,
        web.netns,
        [
            sys.executable,
            "-m",
            "http.server",
            "8080",
            "--bind",
            str(web.address),
            "--directory",
            str(tmp_path / "www"),
        ],
        name="web",
    )
    url = "http://web.serving.svc.cluster.local:8080/hello.txt"
    fetched = None
    for _ in range(50):  # bounded: the server needs a moment to listen
        fetched = netns.run_in(client.netns, [sys.executable, "-c", FETCH, url], timeout=10)
        if fetched.returncode == 0:
            break
        time.sleep(0.1)
    assert fetched is not None
    assert fetched.stdout == "hello from web"

    resolved = netns.run_in(other.netns, ["getent", "hosts", "web"], timeout=10)
    assert resolved.stdout.split() == [str(web.address), "web", "web.serving.svc.cluster.local"]
    routes = netns.run_in(other.netns, ["ip", "route"], timeout=10).stdout
    assert "default" not in routes  # nothing but the rehearsal subnet is reachable
    assert "10.231.0.0/24 dev eth0" in routes
    ports = netns.ip("-n", net.bridge_netns, "-o", "link", "show", "master", netns.BRIDGE)
    assert len(ports.splitlines()) == 3

    log = Path(state.processes[0].log)
    assert log.exists()
    assert netns.teardown(state) == []
    assert server.returncode is not None  # reaped, not a zombie
    assert not Path(f"/proc/{server.pid}").exists()
    assert ours(run) == ([], [])
    assert not state.path.exists()
    assert not log.exists()


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Orphans of a crashed child get re-parented to this test, which can then reap them
    (PID 1 on this machine does not)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    assert libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0
    yield
    libc.prctl(pr_set_child_subreaper, 0, 0, 0, 0)


CRASHER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from scripts.rehearsal import netns
    state = netns.State.load(Path(sys.argv[1]))
    net = netns.plan_network(sys.argv[2], [("a", ["a"]), ("b", ["b"])])
    netns.create_network(state, net)
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    netns.start_process(state, net.hosts[0].netns, sleeper, name="sleeper")
    os._exit(3)  # a crash: no teardown, no wait
    """
)


@pytest.mark.usefixtures("subreaper")
@pytest.mark.netns
@needs_root_and_ip
def test_teardown_from_the_state_file_after_a_crash(state: netns.State) -> None:
    run = run_tag("b")
    crashed = subprocess.run(
        [sys.executable, "-c", CRASHER, str(state.path), run],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert crashed.returncode == 3, crashed.stderr
    recovered = netns.State.load(state.path)
    assert recovered.namespaces == [f"qvr-{run}-br", f"qvr-{run}-a", f"qvr-{run}-b"]
    sleeper = recovered.processes[0].pid
    assert Path(f"/proc/{sleeper}").exists()
    assert len(ours(run)[0]) == 3

    assert netns.teardown(recovered) == []
    assert not Path(f"/proc/{sleeper}").exists()
    assert ours(run) == ([], [])
    assert not state.path.exists()


@pytest.mark.netns
@needs_root_and_ip
def test_teardown_touches_nothing_outside_the_rehearsal(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    foreign_dir = tmp_path / "qvr-dev-x"
    foreign_dir.mkdir()
    state = netns.State(
        path=tmp_path / "rehearsal" / "state.json",
        namespaces=["default"],
        etc_dirs=[str(foreign_dir)],
        files=[str(outside)],
    )
    problems = netns.teardown(state)
    assert "refusing to touch namespace 'default': not a qvr- name" in problems
    assert f"refusing to remove {foreign_dir}: not /etc/netns/qvr-*" in problems
    assert any(p.startswith(f"refusing to remove {outside}: outside ") for p in problems)
    assert outside.read_text() == "keep me"
    assert foreign_dir.is_dir()


@pytest.mark.netns
@needs_root_and_ip
def test_an_engine_group_forms_across_namespaces_by_host_name(state: netns.State) -> None:
    """The rehearsal's use: leader and headless worker in their own hosts, found by name."""
    run = run_tag("c")
    leader_name = "qwen-0.qwen.serving"
    net = netns.plan_network(
        run, [("leader", [leader_name]), ("worker", ["qwen-0-1.qwen.serving"]), ("client", [])]
    )
    leader, worker, client = net.hosts
    netns.create_network(state, net)
    serve = (
        "--join-timeout 20 serve Qwen/Qwen3-VL-32B-Instruct --port 8000 -tp 4 -pp 2 "
        f"--nnodes 2 --master-addr {leader_name} --master-port 29501"
    )
    standin = [sys.executable, "-m", "scripts.engine_standin"]
    standin += serve.split()
    env = {"PATH": os.environ["PATH"]}
    netns.start_process(
        state,
        leader.netns,
        [*standin, "--node-rank", "0"],
        name="leader",
        env=env | {"VLLM_HOST_IP": str(leader.address)},
    )
    netns.start_process(
        state,
        worker.netns,
        [*standin, "--node-rank", "1", "--headless"],
        name="worker",
        env=env | {"VLLM_HOST_IP": str(worker.address)},
    )
    models = None
    for _ in range(100):  # bounded: the group forms, then the leader listens
        models = netns.run_in(
            client.netns,
            [sys.executable, "-c", FETCH, f"http://{leader_name}:8000/v1/models"],
            timeout=10,
        )
        if models.returncode == 0:
            break
        time.sleep(0.1)
    assert models is not None
    assert '"id": "Qwen/Qwen3-VL-32B-Instruct"' in models.stdout
    worker_log = Path(state.processes[1].log).read_text()
    assert f"group formed: {{'0': '{leader.address}', '1': '{worker.address}'}}" in worker_log
    assert netns.teardown(state) == []
    assert ours(run) == ([], [])
