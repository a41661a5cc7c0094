"""Run a stack's data plane on this machine: the offline rehearsal.

`python -m scripts.rehearse --stack dev` brings up, in network namespaces, the gateway (nginx), the
engines (the real vLLM CPU engine on a tiny Qwen3-VL, or with --engine standin a CPU
stand-in for `vllm serve`, given each pod's command line and env),
Redis, Prometheus with the alert rules, the exporters and chronyd on every simulated
node, all from the configs the cluster gets (docs/rehearsal.md lists every difference).
It prints progress, then the endpoints, and runs until Ctrl-C (or, with --detach,
until `python -m scripts.rehearse down`). Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Final, NoReturn, TextIO

from scripts.rehearsal import netns, runner
from scripts.rehearsal.layout import DEFAULT_STATE_DIR
from scripts.rehearsal.plan import (
    DEFAULT_ENGINE_TIMEOUT_S,
    DEFAULT_JOIN_TIMEOUT_S,
    ENGINE_KINDS,
    Corruption,
    Endpoint,
    Layout,
    Options,
    PlanError,
    RehearsalPlan,
    RunSecrets,
    generate_secrets,
    plan_rehearsal,
    stack_path,
    substitution_table,
)
from scripts.rehearsal.real_engine import (
    DEFAULT_DISTRIBUTED_TIMEOUT_S,
    DEFAULT_MODEL,
    DEFAULT_VLLM,
    RealEngine,
)
from scripts.verification import config_hash
from stacks.schema import Settings
from stacks.settings import SettingsError, load_stack_file

DEFAULT_TIMEOUT_S: Final = 60.0
DOWN_TIMEOUT_S: Final = 60.0
READY_MARKER: Final = "\x00qvr-rehearsal-ready"


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP: stop and tear down."""


def _interrupt(signum: int, _frame: FrameType | None) -> NoReturn:
    raise Interrupted(signal.Signals(signum).name)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.rehearse",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples (python -m scripts.rehearse ...):\n"
        "  --stack dev              # foreground; Ctrl-C tears everything down\n"
        "  --stack staging --detach # returns once up; stop with `python -m scripts.rehearse down`\n"
        "  status\n"
        "  down                     # also after a crash (from the state file)\n"
        "  substitutions            # what differs from the cluster\n"
        "  firewall --stack staging # the nftables rules each namespace gets\n",
    )
    p.add_argument(
        "command",
        nargs="?",
        default="up",
        choices=("up", "down", "status", "substitutions", "firewall"),
        help="up (default): bring a stack up; down: tear it down; status: show it; "
        "substitutions: print the cluster/rehearsal differences; firewall: print the "
        "nftables rules `up` would load into each namespace (the stack's NetworkPolicies)",
    )
    p.add_argument(
        "--stack",
        default="dev",
        help="a stack name (dev, staging, prod: Pulumi.<stack>.yaml) or a stack file (dev)",
    )
    p.add_argument(
        "--max-groups",
        type=int,
        default=1,
        help="at most this many LeaderWorkerSet groups per deployment (default 1: fits 2 cores)",
    )
    p.add_argument("--detach", action="store_true", help="return once up; keep running")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"state, configs and logs (default {DEFAULT_STATE_DIR})",
    )
    p.add_argument(
        "--run",
        help="run id in the namespace names qvr-<run>-<host> (default: from the stack name)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds each stage may take to come up (default {DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--engine",
        choices=ENGINE_KINDS,
        default="real",
        help="real (default): the vLLM CPU engine (`make engine`) on a tiny Qwen3-VL, from "
        "the pods' command lines with the listed CPU substitutions; standin: the CPU "
        "stand-in (scripts/engine_standin.py), no inference, starts in a second",
    )
    p.add_argument(
        "--engine-timeout",
        type=float,
        default=DEFAULT_ENGINE_TIMEOUT_S,
        help="seconds a real engine (group) may take to be ready "
        f"(default {DEFAULT_ENGINE_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--vllm", type=Path, default=DEFAULT_VLLM, help=f"the real engine (default {DEFAULT_VLLM})"
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        default=DEFAULT_MODEL,
        help=f"the model the real engines serve (default {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--join-timeout",
        type=float,
        default=None,
        help="seconds an engine group may take to form: the real engine's "
        f"--distributed-timeout-seconds (default {DEFAULT_DISTRIBUTED_TIMEOUT_S:g}), the "
        f"stand-in's --join-timeout (default {DEFAULT_JOIN_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--firewall",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="enforce the stack's NetworkPolicies with nftables inside the namespaces "
        "(default on; --no-firewall: every namespace reaches every other)",
    )
    p.add_argument(
        "--corrupt",
        action="append",
        default=[],
        metavar="POD:--FLAG=VALUE",
        help="test hook: replace a flag's value in one engine pod's command line "
        "(e.g. qwen3-vl-32b-0-1:--master-port=29999); the rehearsal must then fail",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    layout = Layout(args.state_dir.resolve())
    try:
        if args.command == "substitutions":
            sys.stdout.write(substitution_table())
            return 0
        if args.command == "firewall":
            return print_firewall(args, layout)
        runner.require_root()  # the state, secrets and processes are root's
        if args.command == "down":
            return down(layout)
        if args.command == "status":
            return status(layout)
        return up(args, layout)
    except (runner.RehearsalFailed, PlanError, netns.NetnsError) as err:
        print(f"rehearse: {err}", file=sys.stderr)
        return 1


# --------------------------------------------------------------------------- up


def load_settings(path: Path) -> Settings:
    try:
        return load_stack_file(path)
    except SettingsError as err:
        raise PlanError(str(err)) from None


def run_id(settings: Settings, given: str | None) -> str:
    run = given or re.sub(r"[^a-z0-9]+", "-", settings.stack.lower()).strip("-")
    if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", run or ""):
        raise PlanError(f"--run {run!r}: lower-case letters, digits and dashes only")
    return run


def up(args: argparse.Namespace, layout: Layout) -> int:
    if layout.state_file.exists():
        raise PlanError(
            f"a rehearsal is already running from {layout.state_dir} "
            "(`rehearse.py status` shows it; `make rehearse-down` stops it)"
        )
    secrets_, real, plan = _plan(args, layout)
    runner.preflight(layout.state_dir)
    if args.engine == "real" and real.missing():
        raise PlanError(
            f"the real engine is not installed: missing {', '.join(real.missing())} "
            "(run `make engine`, or rehearse with --engine standin)"
        )
    runner.check_namespaces_free(plan)
    # Logs of an earlier failed run (kept for reading) would be appended to.
    shutil.rmtree(netns.log_dir(netns.State(layout.state_file)), ignore_errors=True)
    if args.detach:
        return _detach(lambda out: _run(plan, secrets_, layout, args, out))
    return _run(plan, secrets_, layout, args, sys.stdout)


def _plan(args: argparse.Namespace, layout: Layout) -> tuple[RunSecrets, RealEngine, RehearsalPlan]:
    """The rehearsal `args` ask for, planned: nothing started, nothing written."""
    path = stack_path(args.stack)
    settings = load_settings(path)
    corruptions = tuple(Corruption.parse(c) for c in args.corrupt)
    secrets_ = generate_secrets(settings)
    real = RealEngine(
        vllm=args.vllm.resolve(),
        model=args.model_dir.resolve(),
        distributed_timeout_s=args.join_timeout or DEFAULT_DISTRIBUTED_TIMEOUT_S,
    )
    options = Options(
        run=run_id(settings, args.run),
        layout=layout,
        max_groups=args.max_groups,
        join_timeout=args.join_timeout or DEFAULT_JOIN_TIMEOUT_S,
        corruptions=corruptions,
        config_hash=config_hash(path),
        engine=args.engine,
        real=real,
        engine_timeout=args.engine_timeout,
        firewall=args.firewall,
    )
    return secrets_, real, plan_rehearsal(settings, secrets_, options)


def print_firewall(args: argparse.Namespace, layout: Layout) -> int:
    """Each namespace's nft script, as `up` writes and loads it (needs no root, starts nothing)."""
    plan = _plan(args, layout)[2]
    if not plan.firewall:
        raise PlanError("--no-firewall: no rules to print")
    texts = {spec.path: spec.text for spec in plan.files}
    for host, path in plan.firewall:
        sys.stdout.write(f"# ---- host {host} ({path.name})\n{texts[path]}")
    return 0


def _run(
    plan: RehearsalPlan, secrets_: RunSecrets, layout: Layout, args: argparse.Namespace, out: TextIO
) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    progress = runner.Progress(out, time.monotonic())
    progress.header(
        f"rehearsal of stack {plan.stack} (run {plan.run}, state in {layout.state_dir})"
    )
    state = netns.State(path=layout.state_file)
    state.save()
    failed = True
    problems: list[str] = []
    try:
        runner.write_supervisor(layout, state)
        runner.bring_up(plan, secrets_, state, progress, timeout=args.timeout)
        key_id, key = secrets_.gateway_key_id, secrets_.gateway_api_key
        out.write("\n" + runner.endpoint_table(plan.endpoints, key_id, key))
        stop_with = "`make rehearse-down`" if args.detach else "Ctrl-C (or `make rehearse-down`)"
        out.write(f"\nUp in {time.monotonic() - progress.started:.1f} s. {stop_with} stops it.\n")
        out.flush()
        if args.detach:
            _release_terminal(layout, state, out)
        runner.supervise(state, lambda: False)
    except Interrupted as stop:
        failed = False
        progress.header(f"{stop}: tearing down")
    except (runner.RehearsalFailed, netns.NetnsError) as err:
        progress.header("rehearsal failed; tearing down")
        out.write(f"rehearse: {err}\n")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop teardown
        problems = runner.teardown(layout, state, keep_logs=failed)
        if problems:
            out.write("teardown left:\n" + "".join(f"  {p}\n" for p in problems))
            out.write("run `make rehearse-down` to retry\n")
        elif failed:
            progress.header(f"torn down; the logs stay in {netns.log_dir(state)}")
        else:
            progress.header("torn down: no namespace, process or file left")
        out.flush()
    return 1 if failed or problems else 0


def _detach(run: Callable[[TextIO], int]) -> int:
    """Bring the rehearsal up in a child that outlives this process; relay its progress
    until it is up (exit 0) or has failed and torn down (its exit status)."""
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # the supervisor: owns (and reaps) every process of the rehearsal
        code = 1
        try:
            os.close(read_end)
            os.setsid()  # no terminal: Ctrl-C in the shell no longer reaches it
            os.dup2(write_end, 1)
            os.dup2(write_end, 2)
            os.close(write_end)
            code = run(sys.stdout)
        finally:
            sys.stdout.flush()
            os._exit(code)
    os.close(write_end)
    ready = False
    with os.fdopen(read_end, encoding="utf-8", errors="replace") as pipe:
        for line in pipe:
            if line.rstrip("\n") == READY_MARKER:
                ready = True
            else:
                sys.stdout.write(line)
                sys.stdout.flush()
    if ready:
        return 0
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) or 1


def _release_terminal(layout: Layout, state: netns.State, out: TextIO) -> None:
    """Tell the waiting parent the rehearsal is up, then log to a file instead of its pipe."""
    out.write(READY_MARKER + "\n")
    out.flush()
    log = runner.supervisor_log(state)
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


# --------------------------------------------------------------------------- down, status


def down(layout: Layout) -> int:
    owner = runner.supervisor_pid(layout)
    if owner is not None and owner != os.getpid():
        print(f"stopping the rehearsal process (pid {owner}); it tears everything down")
        if not runner.stop_supervisor(layout, DOWN_TIMEOUT_S):
            print(f"it did not stop within {DOWN_TIMEOUT_S:g} s; tearing down from the state file")
    if not layout.state_file.exists():
        print(
            "done: no namespace, process or file left"
            if owner
            else f"nothing to tear down in {layout.state_dir}"
        )
        return 0
    state = netns.State.load(layout.state_file)
    print(
        f"tearing down {len(state.namespaces)} namespaces and {len(state.processes)} processes "
        f"recorded in {layout.state_file}"
    )
    problems = runner.teardown(layout, state)
    for problem in problems:
        print(f"  left: {problem}")
    print("done" if not problems else "some things could not be removed (see above)")
    return 1 if problems else 0


def status(layout: Layout) -> int:
    if not layout.state_file.exists():
        print(f"no rehearsal in {layout.state_dir}")
        return 1
    state = netns.State.load(layout.state_file)
    owner = runner.supervisor_pid(layout)
    print(
        f"state: {layout.state_file}; rehearsal process: {owner or 'gone (run `make rehearse-down`)'}"
    )
    running = 0
    for record in state.processes:
        alive = netns.is_running(record)
        running += alive
        print(f"  {'running' if alive else 'EXITED ':<7}  {record.netns:<32} {record.name}")
    print(f"{running}/{len(state.processes)} processes running")
    if layout.inventory.exists() and layout.secrets.exists():
        inventory = json.loads(layout.inventory.read_text())
        secrets_ = json.loads(layout.secrets.read_text())
        endpoints = [Endpoint(**e) for e in inventory["endpoints"]]
        print()
        print(
            runner.endpoint_table(
                endpoints, secrets_["gateway_key_id"], secrets_["gateway_api_key"]
            ),
            end="",
        )
    return 0 if owner is not None and running == len(state.processes) else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
