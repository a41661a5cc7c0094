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
same concurrency, rounds interleaved; (2) time to first streamed chunk, the same way;
(3) session affinity: share of each session's requests on one engine, sessions per
engine; (4) failover: an engine SIGKILLed mid-run, requests that failed before any
byte of a reply vs streams cut in flight. Needs root (network namespaces).
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
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Final

from components.render.nginx_conf import (
    API_KEYS_FILE,
    CHAT_PATH,
    ENGINE_AUTH_FILE,
    FAIL_TIMEOUT_SECONDS,
    HEALTH_PATH,
    MAX_FAILS,
    Backend,
    NginxPaths,
    build_nginx_conf_args,
    render_api_keys_map,
    render_engine_auth,
    render_nginx_conf,
)
from components.render.vllm_command import served_model_name
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
from scripts.rehearsal import netns
from scripts.rehearsal.plan import (
    AS_NGINX_USER,
    NGINX_USER,
    PROCESS_PATH,
    STANDIN,
    base_env,
    nginx_argv,
    random_password,
)
from scripts.rehearsal.runner import chown_to, http_ok
from stacks.naming import GATEWAY_PORT, VLLM_PORT
from stacks.settings import load_stack_file, stack_file

REPO_ROOT: Final = Path(__file__).resolve().parent.parent

RUN: Final = "bench"
STACK: Final = "dev"  # whose gateway settings and model the topology uses
DEFAULT_STATE_DIR: Final = Path("/tmp/qvr-bench")
DEFAULT_RECORDS_ROOT: Final = REPO_ROOT / "build" / "bench"
CLIENT: Final = "client"
GATEWAY: Final = "gateway"
ENGINES: Final = ("engine-0", "engine-1", "engine-2")
VICTIM: Final = "engine-1"
SOLO, TRIO = "solo", "trio"
FIGURES: Final = ("overhead", "streaming", "affinity", "failover")
# What the topology runs: namespaces (ip), nginx dropped to its user (setpriv), the
# readiness probes (curl), the stand-ins (python3).
PROGRAMS: Final = ("ip", "setpriv", "curl", "nginx", "python3")
# The stack's rate limit (20/s per key) would make the limiter the thing measured; it stays
# in the config (its lookup is part of the gateway's cost) with room for any load here.
RATE_LIMIT_PER_S: Final = 10_000.0
RATE_BURST: Final = 10_000
READY_TIMEOUT_S: Final = 30.0
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
    served_model: str
    affinity_header: str

    def netns(self, role: str) -> str:
        return netns.netns_name(RUN, role)

    def address(self, role: str) -> str:
        return str(self.network.host(self.netns(role)).address)

    @property
    def gateway_url(self) -> str:
        return f"http://{self.address(GATEWAY)}:{GATEWAY_PORT}"

    def engine_url(self, engine: str) -> str:
        return f"http://{self.address(engine)}:{VLLM_PORT}"

    def engine_of(self, upstream: str) -> str:
        """'10.231.0.4:8000' (an access log's upstream address) -> 'engine-0'."""
        host = upstream.strip().rsplit(":", 1)[0]
        for engine in ENGINES:
            if self.address(engine) == host:
                return engine
        return upstream


def render_bench_conf(
    addresses: Mapping[str, str], paths: NginxPaths, settings_path: Path
) -> tuple[str, str, str]:
    """(nginx.conf, affinity header, served model): the dev stack's gateway config with the
    bench's two upstreams, session affinity and a rate limit that never triggers."""
    settings = load_stack_file(settings_path)
    engines = tuple(f"{addresses[e]}:{VLLM_PORT}" for e in ENGINES)
    args = build_nginx_conf_args(
        settings,
        mode="static",
        static_addresses={d.name: engines[:1] for d in settings.serving.deployments},
        paths=paths,
    )
    args = replace(
        args,
        deployments=(
            Backend(name=SOLO, addresses=engines[:1]),
            Backend(name=TRIO, addresses=engines),
        ),
        default_deployment=SOLO,
        load_balancing="sessionAffinity",
        requests_per_second=RATE_LIMIT_PER_S,
        burst=RATE_BURST,
    )
    model = served_model_name(settings.default_deployment)
    return render_nginx_conf(args), settings.gateway.affinity_header, model


@contextlib.contextmanager
def topology(state_dir: Path, opts: BenchOptions) -> Iterator[Topology]:
    """Namespaces, engines and nginx; torn down whatever happens."""
    state_file = state_dir / "state.json"
    if state_file.exists():
        raise BenchError(f"a bench topology is recorded in {state_file}: run `bench.py down`")
    roles = (CLIENT, GATEWAY, *ENGINES)
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
            shutil.rmtree(state_dir / GATEWAY, ignore_errors=True)  # nginx's temp directories
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


def _bring_up(state: netns.State, network: netns.Network, opts: BenchOptions) -> Topology:
    base = state.path.parent
    print(f"==> topology: {len(network.hosts)} namespaces on a bridge ({network.bridge_netns})")
    netns.create_network(state, network)
    addresses = {
        h.netns.removeprefix(f"{netns.PREFIX}{RUN}-"): str(h.address) for h in network.hosts
    }
    run_dir = base / "gateway" / "run"
    paths = NginxPaths(
        secrets_dir=str(base / "gateway" / "secrets"),
        runtime_dir=str(run_dir),
        access_log=str(run_dir / "access.log"),
    )
    conf_text, header, model = render_bench_conf(addresses, paths, stack_file(STACK))
    topo = Topology(
        state=state,
        network=network,
        engines={},
        client_key=random_password(),
        engine_key=random_password(),
        access_log=run_dir / "access.log",
        served_model=model,
        affinity_header=header,
    )
    conf = _write_gateway_files(state, paths, conf_text, topo)
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
                model,
                "--port",
                str(VLLM_PORT),
                "--served-model-name",
                model,
                "--disable-uvicorn-access-log",
            ],
            name=engine,
            env=env,
        )
        topo.engines[engine] = proc.pid
    for engine in ENGINES:
        _wait_http(topo, f"{topo.engine_url(engine)}/health", engine)
    netns.start_process(
        state,
        topo.netns(GATEWAY),
        [*AS_NGINX_USER, *nginx_argv(load_stack_file(stack_file(STACK)), conf)],
        name="nginx",
        env={"PATH": PROCESS_PATH},
    )
    _wait_http(topo, f"{topo.gateway_url}{HEALTH_PATH}", "nginx")
    print(
        f"    engines {', '.join(f'{e} {topo.address(e)}' for e in ENGINES)}; gateway "
        f"{topo.address(GATEWAY)}; client {topo.address(CLIENT)}",
        flush=True,
    )
    return topo


def _write_gateway_files(
    state: netns.State, paths: NginxPaths, conf_text: str, topo: Topology
) -> Path:
    secrets_dir, run_dir = Path(paths.secrets_dir), Path(paths.runtime_dir)
    for directory in (secrets_dir, run_dir):
        directory.mkdir(parents=True, exist_ok=True)
    chown_to(run_dir, NGINX_USER)
    files = {
        run_dir.parent / "nginx.conf": conf_text,
        secrets_dir / API_KEYS_FILE: render_api_keys_map({"bench": topo.client_key}),
        secrets_dir / ENGINE_AUTH_FILE: render_engine_auth(topo.engine_key),
    }
    for path, text in files.items():
        state.record_file(path)
        path.write_text(text, encoding="utf-8")
        path.chmod(0o440 if path.parent == secrets_dir else 0o644)
        chown_to(path, NGINX_USER)
    state.record_file(topo.access_log)
    return run_dir.parent / "nginx.conf"


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
    direct = (
        topo.engine_url("engine-0"),
        topo.engine_key,
        Route(SOLO, topo.served_model, CHAT_PATH),
    )
    gateway = (
        topo.gateway_url,
        topo.client_key,
        Route(SOLO, topo.served_model, f"/{SOLO}{CHAT_PATH}"),
    )
    trio = (
        topo.gateway_url,
        topo.client_key,
        Route(TRIO, topo.served_model, f"/{TRIO}{CHAT_PATH}"),
    )
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
    # (3) and (4): sessions over all three engines, non-streamed and streamed.
    trio_phases: tuple[tuple[str, int, float, dict[str, Any]], ...] = (
        (
            "affinity",
            opts.affinity_users,
            opts.affinity_s,
            {"stream_ratio": 0.0, "max_tokens": opts.max_tokens},
        ),
        ("failover", opts.failover_users, opts.failover_s, {"stream_ratio": 1.0}),
    )
    for name, users, duration_s, mode in trio_phases:
        if name in figures:
            phases.append(
                phase(
                    name,
                    trio,
                    users=users,
                    duration_s=duration_s,
                    sessions_per_user=opts.sessions_per_user,
                    **mode,
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
        access=read_access_log(topo.access_log),
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
    records = [r for r in result.records if r.phase == "affinity" and r.ok]
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
            "spread: most / fewest sessions on an engine",
            _fmt_ratio(_ratio(max(home[e] for e in ENGINES), min(home[e] for e in ENGINES))),
        ],
    ]
    return Figure(
        key="affinity",
        title="(3) Session affinity over three engines",
        command=opts.command(["affinity"]),
        table=table,
        notes=[
            f"{opts.affinity_users} users x {opts.sessions_per_user} sessions each "
            f"({topo.affinity_header} header), {opts.affinity_s:g} s; each request's engine "
            "from the gateway's access log (upstream_addr), joined on X-Request-Id.",
            f"requests not found in the access log: {unmatched}",
            "The spread is what nginx's `hash` makes of these particular session ids "
            "(u0-s0 ... u5-s4): the same ids give the same spread on every run.",
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
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True, timeout=10, check=False)
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
        "numbers are from one run on the machine below; the engines are CPU stand-ins "
        "(scripts/engine_standin.py), so absolute latencies say nothing about a GPU. What "
        "carries over is the **ratios**: what the gateway adds to a request, whether "
        "sessions stay on one engine, and what a dying engine costs. Client, gateway and "
        "engines share the same cores with whatever else runs: the per-round ratios show "
        "how large that noise was. "
        "docs/loadtest.md explains the setup and the figures.",
        "",
        f"- command: `{opts.command(figure_keys)}` (same as `make bench`, which also writes this file)",
        f"- date: {date}",
        *(f"- {name}: {value}" for name, value in machine()),
        "",
        "Setup: five network namespaces on a private bridge (scripts/rehearsal/netns.py): a "
        "client running the load generator (Locust, scripts/loadtest_worker.py), the gateway "
        "(nginx with the config `render_nginx_conf` gives the cluster, from the dev stack's "
        "gateway settings, static upstreams, session affinity, rate limit raised out of the "
        f"way) and three engine stand-ins answering as `{STACK}`'s model. Route `/{SOLO}/` "
        f"reaches engine-0 only, the same engine the direct runs use; `/{TRIO}/` spreads "
        "over all three.",
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


def parser() -> argparse.ArgumentParser:
    d = BenchOptions()
    p = argparse.ArgumentParser(
        prog="python -m scripts.bench",
        description=(__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("command", nargs="?", default="run", choices=("run", "down"))
    p.add_argument("--only", action="append", choices=FIGURES, help="measure these figures only")
    p.add_argument("--write", type=Path, help="write the results as Markdown (docs/BENCHMARKS.md)")
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
        with topology(args.state_dir.resolve(), opts) as topo:
            result = run_phases(topo, plan_phases(topo, opts, figure_keys), opts, out)
            shutil.copy(topo.access_log, out / "access.log")
            builders = {
                "overhead": lambda: overhead_figure(result, opts),
                "streaming": lambda: streaming_figure(result, opts),
                "affinity": lambda: affinity_figure(result, topo, opts),
                "failover": lambda: failover_figure(result, topo, opts),
            }
            figures = [builders[key]() for key in figure_keys]
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
