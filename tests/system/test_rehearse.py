"""The offline rehearsal end to end: bring up dev and staging, verify them, tear them down.

Each test runs the real `python -m scripts.rehearse` and `python -m scripts.verify` as a user would, in
its own state directory and with its own run id (so a rehearsal someone else runs on the
machine is never touched), and asserts that teardown leaves nothing behind: no namespace,
no /etc/netns entry, no process, no child of this test. The negative cases corrupt one
worker's command line through the rehearsal's documented test hook (`--corrupt`) and
expect the rehearsal to fail with a message naming the pod and the flag.

This test process makes itself a child subreaper: the detached rehearsal outlives the
`rehearse.py` that started it, and PID 1 on this machine does not reap orphans.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.rehearsal_run import (
    REHEARSAL_MARKS,
    REHEARSE,
    Run,
    assert_nothing_left,
    assert_verified,
    rehearse,
    subreaper,
    verify,
)

UP_TIMEOUT_S = 120.0
# The mechanics (foreground and detached runs, status, a clashing run id, failures that
# name the pod and flag) run on the stand-in, which starts in a second; the real engines
# are tests/system/test_rehearse_real.py's.
STANDIN = ("--engine", "standin")

pytestmark = REHEARSAL_MARKS


@pytest.fixture(scope="module", autouse=True)
def _subreaper() -> Iterator[None]:
    with subreaper():
        yield


@pytest.fixture
def state_parent() -> Iterator[Path]:
    """A scratch directory nginx's unprivileged user can reach (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="qvr-ci-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def read_until(proc: subprocess.Popen[bytes], marker: str, timeout: float) -> str:
    """The process's output up to and including `marker` (bounded in time).

    Raw reads on the pipe: a buffered reader could hold the marker while select() says
    there is nothing more to read.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        chunk = os.read(fd, 65536) if ready else b""
        if ready and not chunk:
            break  # the process closed its output: it has exited
        seen += chunk
    text = seen.decode(errors="replace")
    if marker not in text:
        pytest.fail(f"no {marker!r} within {timeout:g} s:\n{text}")
    return text


def test_dev_comes_up_verifies_and_ctrl_c_tears_it_down(tmp_path: Path, state_parent: Path) -> None:
    run = Run("dev", state_parent / "state")
    proc = subprocess.Popen(
        [*REHEARSE, "--stack", "dev", *run.args(*STANDIN)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    pids: list[int] = []
    try:
        output = read_until(proc, "Up in", UP_TIMEOUT_S)
        pids = run.recorded_pids()
        assert "engine leader" in output
        assert "synchronised to 10.231.0.1" in output  # the time server is the first host
        assert "API key (default)" in output
        # bridge, time server, gateway, services, engine, client
        assert len(run.namespaces()) == 6
        result = verify(run, tmp_path)
        assert_verified(result, tmp_path, run.stack)
        for host in ("gateway-0", "services", "qwen3-vl-2b-0"):
            assert host in result.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert proc.returncode == 0, rest
    assert "torn down: no namespace, process or file left" in rest
    assert_nothing_left(run, pids)


def test_staging_detached_multi_node_group_verifies_and_down_removes_it(
    tmp_path: Path, state_parent: Path
) -> None:
    run = Run("staging", state_parent / "state")
    up = rehearse("--stack", "staging", "--detach", *run.args(*STANDIN), timeout=UP_TIMEOUT_S)
    pids = run.recorded_pids()
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "engine worker rank 1       ready joined its leader (:29501)" in up.stdout
        status = rehearse("status", *run.args(), timeout=30)
        assert status.returncode == 0, status.stdout
        assert f"{len(pids)}/{len(pids)} processes running" in status.stdout
        # A second rehearsal with the same run id must not start, let alone tear this one down.
        twin = Run("staging", state_parent / "twin")
        clash = rehearse(
            "--stack", "staging", "--state-dir", str(twin.state_dir), "--run", run.run, timeout=60
        )
        assert clash.returncode == 1
        assert f"already exist: another rehearsal uses run id '{run.run}'" in clash.stderr
        result = verify(run, tmp_path)
        assert_verified(result, tmp_path, run.stack)
        assert "qwen3-vl-32b-0-1" in result.stdout  # the worker's host was checked
    finally:
        down = rehearse("down", *run.args(), timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert_nothing_left(run, pids)


@pytest.mark.parametrize(
    ("corruption", "message"),
    [
        (
            "--master-port=29999",
            "cannot reach --master-addr qwen3-vl-32b-0.qwen3-vl-32b.qwen-vl --master-port 29999",
        ),
        ("--node-rank=2", "--node-rank 2 must satisfy 0 <= node_rank < --nnodes 2"),
    ],
)
def test_a_corrupted_worker_fails_the_rehearsal_naming_pod_and_flag(
    state_parent: Path, corruption: str, message: str
) -> None:
    run = Run("staging", state_parent / "state")
    pod = "qwen3-vl-32b-0-1"
    hook = f"{pod}:{corruption}"
    result = rehearse(
        "--stack",
        "staging",
        *run.args(*STANDIN, "--join-timeout", "5", "--corrupt", hook),
        timeout=UP_TIMEOUT_S,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    failure = result.stdout[result.stdout.index("rehearse: ") :]
    assert f"pod {pod} (engine worker rank 1) exited with status 1" in failure
    assert message in failure
    assert f"corrupted: {corruption.replace('=', ' ')}" in result.stdout
    assert_nothing_left(run, [])
