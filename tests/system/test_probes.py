"""The testinfra suite's process probe against the real process table of this machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import testinfra

from tests.infra import probes


def test_host_processes_lists_odd_titles_and_arguments() -> None:
    # A task name with spaces (node's process.title sets it, e.g. `npm pack`) shifted the
    # columns of testinfra's `ps` parsing and broke every test that listed processes.
    # Reading /proc instead broke on an argument with a newline (a multi-line `bash -c`).
    script = "open('/proc/self/comm', 'w').write('npm pack probe')\nprint(flush=True); input()"
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "\n"
        assert Path(f"/proc/{child.pid}/comm").read_text() == "npm pack probe\n"
        listed = dict(probes.host_processes(testinfra.get_host("local://")))
        assert listed.get(child.pid, "").endswith(script.replace("\n", " "))
    finally:
        child.kill()
        child.wait(timeout=10)
