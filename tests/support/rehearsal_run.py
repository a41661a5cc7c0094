"""Running `python -m scripts.rehearse` and `python -m scripts.verify` as a user would, for the
system tests of the rehearsal (tests/system/test_rehearse*.py).

Each run has its own state directory and run id, so a rehearsal someone else runs on the
machine is never touched. The test process makes itself a child subreaper (`subreaper()`):
a detached rehearsal outlives the `rehearse.py` that started it, and PID 1 on this machine
does not reap orphans.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts.engine import launch
from scripts.rehearsal import netns
from scripts.rehearsal.plan import PROCESS_PATH
from scripts.rehearsal.real_engine import RealEngine
from scripts.rehearsal.runner import PROGRAMS

ROOT = Path(__file__).resolve().parents[2]
REHEARSE = [sys.executable, "-m", "scripts.rehearse"]
VERIFY = [sys.executable, "-m", "scripts.verify"]
VERIFY_TIMEOUT_S = 300.0
PR_SET_CHILD_SUBREAPER = 36

MISSING_PROGRAMS = [p for p in PROGRAMS if shutil.which(p, path=PROCESS_PATH) is None]
MISSING_ENGINE = RealEngine().missing()  # `make engine`
REHEARSAL_MARKS = [
    pytest.mark.rehearsal,
    pytest.mark.skipif(os.geteuid() != 0, reason="the rehearsal needs root"),
    pytest.mark.skipif(
        bool(MISSING_PROGRAMS), reason=f"missing programs (make debs): {MISSING_PROGRAMS}"
    ),
]


def rehearse(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`python -m scripts.rehearse ARGS`, its output captured, bounded in time."""
    return subprocess.run(
        [*REHEARSE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@contextmanager
def subreaper() -> Iterator[None]:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        reap_children()
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def reap_children() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def children() -> list[int]:
    """Pids whose parent is this test process (zombies included)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == os.getpid():
            found.append(int(stat.parent.name))
    return found


@dataclass(frozen=True)
class Run:
    """One rehearsal of a test: its stack (name or file), run id and state directory."""

    stack: str
    state_dir: Path
    name: str = ""  # the run id's suffix (default: the stack's)

    @property
    def run(self) -> str:
        return f"ci{os.getpid()}-{self.name or self.stack}"

    def args(self, *extra: str) -> list[str]:
        return ["--state-dir", str(self.state_dir), "--run", self.run, *extra]

    def namespaces(self) -> list[str]:
        return netns.list_namespaces(f"qvr-{self.run}-")

    def etc_dirs(self) -> list[Path]:
        return sorted(netns.NETNS_ETC.glob(f"qvr-{self.run}-*"))

    def recorded_pids(self) -> list[int]:
        """The pids in the run's state file ([] when `up` failed before writing one)."""
        if not (self.state_dir / "state.json").exists():
            return []
        state = json.loads((self.state_dir / "state.json").read_text())
        return [p["pid"] for p in state["processes"]]

    def inventory(self) -> dict[str, object]:
        return json.loads((self.state_dir / "inventory.json").read_text())


def shm_files() -> frozenset[str]:
    return frozenset(launch.shm_files())


def assert_nothing_left(
    run: Run, pids: list[int], shm_before: frozenset[str] = frozenset()
) -> None:
    """No namespace, /etc/netns entry, process, child, state file; no engine shm leftovers
    (files that appeared since `shm_before` and no live process holds)."""
    reap_children()
    assert run.namespaces() == []
    assert run.etc_dirs() == []
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
    assert children() == []
    assert not (run.state_dir / "state.json").exists()
    assert not (run.state_dir / "secrets.json").exists()
    assert not (run.state_dir / "hosts").exists()
    if shm_before:
        assert launch.remove_leftover_shm(shm_before) == []


def verify(run: Run, record_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VERIFY, "--stack", run.stack, *run.args()[:2], "--record-dir", str(record_dir)],
        capture_output=True,
        text=True,
        timeout=VERIFY_TIMEOUT_S,
        check=False,
    )


def assert_verified(
    result: subprocess.CompletedProcess[str], record_dir: Path, stack: str | None = None
) -> None:
    """verify.py passed and wrote one `passed` record (of `stack`, when given)."""
    assert result.returncode == 0, result.stdout + result.stderr
    [path] = list(record_dir.glob("*.json"))
    record = json.loads(path.read_text())
    assert record["result"] == "passed"
    assert record["target"] == "rehearsal"
    if stack is not None:
        assert record["stack"] == stack


# A TCP connection's outcome, from inside a namespace: the sender sees a dropped SYN (by the
# receiver's ingress rules or its own egress rules) as a timeout, a closed port as a refusal.
TCP_PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("connected")
except TimeoutError:
    print("timeout")
except OSError as err:
    print(type(err).__name__)
"""
CURL_TIMEOUT_EXIT = 28


def tcp_outcome(netns_: str, address: str, port: int, wait_s: float = 3.0) -> str:
    """`connected`, `timeout` or the error's name (`ConnectionRefusedError`)."""
    argv = [sys.executable, "-c", TCP_PROBE, address, str(port), str(wait_s)]
    return netns.run_in(netns_, argv, timeout=wait_s + 10).stdout.strip()


def http_outcome(netns_: str, url: str, *curl_args: str, wait_s: float = 3.0) -> str:
    """The HTTP status of a request from inside `netns_` (`200`), or `timeout`."""
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", f"{wait_s:g}"]
    done = netns.run_in(netns_, [*argv, *curl_args, url], timeout=wait_s + 10)
    if done.returncode == CURL_TIMEOUT_EXIT:
        return "timeout"
    return done.stdout.strip() if done.returncode == 0 else f"curl exit {done.returncode}"
