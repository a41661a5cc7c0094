"""Run the testinfra suite (tests/infra) against a stack and record the result.

Targets:
  rehearsal  the running offline rehearsal (`make rehearse`): one pytest per simulated
             host, inside its network namespace (`ip netns exec`), so socket checks see
             that host's sockets;
  kubectl    the stack's pods (gateway, engine leaders and workers, Redis, Prometheus)
             through `kubectl exec`; HTTP checks go through `kubectl port-forward`;
             also the checks that only exist there (GPUs, EFA, /dev/shm in engine pods);
  ssh        the stack's nodes (chrony, node exporter; GPUs, EFA devices and huge pages
             on GPU nodes), listed through the cluster API.

The verification record (stack, time, config hash, target, result) goes to
.verify/<stack>.json, where scripts/promote.py reads it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode

from components.render.alert_rules import build_alert_rules
from components.render.gateway_pod import COMPONENT as GATEWAY_COMPONENT
from components.render.nginx_conf import API_KEYS_FILE
from components.render.node_group_spec import EFA_HUGEPAGES
from components.render.redis_conf import EXPORTER_PASSWORD_ENTRY, EXPORTER_USER
from components.render.time_sync import (
    AMAZON_TIME_SYNC_SERVER,
    CHRONY_CONF_PATH,
    render_chrony_conf,
)
from scripts.rehearsal import inventory as inv
from scripts.rehearsal.layout import DEFAULT_STATE_DIR
from scripts.rehearsal.plan import (
    EnginePod,
    Layout,
    engine_roles,
    gateway_vars,
    node_vars,
    stack_path,
)
from scripts.verification import (
    RECORD_DIR,
    RecordError,
    Target,
    config_hash,
    new_record,
    write_record,
)
from stacks.catalog import instance_type, supports_phc
from stacks.naming import (
    COMPONENT_LABEL,
    ENGINE_API_KEY_ENTRY,
    GATEWAY_KEYS_SECRET,
    GATEWAY_NAME,
    GATEWAY_PORT,
    INSTANCE_TYPE_LABEL,
    LWS_GROUP_INDEX_LABEL,
    LWS_NAME_LABEL,
    LWS_WORKER_INDEX_LABEL,
    MONITORING_NAMESPACE,
    NAME_LABEL,
    NODE_GROUP_LABEL,
    PROMETHEUS_POD_LABELS,
    PROMETHEUS_PORT,
    REDIS_CONFIG_SECRET,
    REDIS_EXPORTER_PORT,
    REDIS_NAME,
    REDIS_PORT,
    VLLM_PORT,
    engine_secret_name,
    lws_name,
)
from stacks.planner import plan_for
from stacks.pod_sizing import shm_size_bytes
from stacks.schema import Settings
from stacks.settings import SettingsError, load_stack_file

ROOT: Final = Path(__file__).resolve().parent.parent
SUITE: Final = ROOT / "tests" / "infra"
HOST_TIMEOUT_S: Final = 300.0  # one host's checks (the slowest wait inside is 60 s)
SUITE_TIMEOUT_S: Final = 1800.0
PORT_FORWARD_TIMEOUT_S: Final = 30.0
KUBECTL_TIMEOUT_S: Final = 60.0
PARALLEL_HOSTS: Final = 2  # pytest processes at once on the rehearsal's 2 cores
PHC_SOURCE: Final = "PHC0"  # chronyc's name of the first PHC refclock


class VerifyError(RuntimeError):
    """A problem the user can fix; the message says what to do."""


@dataclass(frozen=True)
class Outcome:
    passed: int
    failed: int
    skipped: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.passed > 0

    def __add__(self, other: Outcome) -> Outcome:
        return Outcome(
            self.passed + other.passed,
            self.failed + other.failed,
            self.skipped + other.skipped,
            self.seconds + other.seconds,
        )

    def summary(self) -> str:
        parts = [f"{self.passed} passed"]
        if self.failed:
            parts.append(f"{self.failed} failed")
        if self.skipped:
            parts.append(f"{self.skipped} skipped")
        return ", ".join(parts) + f" in {self.seconds:.1f}s"


NO_TESTS: Final = Outcome(0, 0, 0, 0.0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.verify",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--stack", required=True, help="dev, staging, prod, or a stack file")
    p.add_argument(
        "--target", choices=("rehearsal", "ssh", "kubectl"), default="rehearsal", help="(rehearsal)"
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"the rehearsal's state directory (default {DEFAULT_STATE_DIR})",
    )
    p.add_argument(
        "--record-dir",
        type=Path,
        default=RECORD_DIR,
        help=f"where the verification record goes (default {RECORD_DIR})",
    )
    p.add_argument("--no-record", action="store_true", help="do not write a record")
    p.add_argument("--kubeconfig", help="kubeconfig for kubectl/ssh (default: kubectl's own)")
    p.add_argument("--context", help="kubeconfig context")
    p.add_argument(
        "--outputs",
        type=Path,
        help="`pulumi stack output --json` of the stack; its `kubeconfig` is used when "
        "--kubeconfig is not given",
    )
    p.add_argument("--ssh-user", help="user for --target ssh (default: ssh's own)")
    p.add_argument("--ssh-config", help="ssh_config file for --target ssh (bastion, keys)")
    p.add_argument("--ssh-identity-file", help="private key for --target ssh")
    p.add_argument("--sudo", action="store_true", help="run the node checks with sudo (ssh)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        path = stack_path(args.stack)
        try:
            settings = load_stack_file(path)
        except SettingsError as err:
            raise VerifyError(str(err)) from None
        outcome = run_target(args, settings, path)
        print(f"{settings.stack} ({args.target}): {outcome.summary()}")
        if not args.no_record:
            record = new_record(
                settings.stack,
                path,
                target=args.target,
                result="passed" if outcome.ok else "failed",
                details=outcome.summary(),
            )
            print(f"record: {write_record(record, args.record_dir)}")
        return 0 if outcome.ok else 1
    except (VerifyError, RecordError, inv.InventoryError) as err:
        print(f"verify: {err}", file=sys.stderr)
        return 2


def run_target(args: argparse.Namespace, settings: Settings, path: Path) -> Outcome:
    target: Target = args.target
    if target == "rehearsal":
        return verify_rehearsal(args.state_dir, settings, path)
    kubectl = Kubectl.from_args(args)
    with tempfile.TemporaryDirectory(prefix="qvr-verify-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        if target == "kubectl":
            inventory = kubectl_inventory(settings, kubectl, workdir, stack)
        else:
            inventory = ssh_inventory(settings, kubectl, args)
        inventory_file = workdir / "inventory.json"
        inventory_file.write_text(json.dumps(inventory, indent=2))
        return run_suite(inventory_file, workdir)


# --------------------------------------------------------------------------- running pytest


def pytest_command(junit: Path, deployed: bool) -> list[str]:
    marker = "deployed or not deployed" if deployed else "not deployed"
    return [
        sys.executable,
        "-m",
        "pytest",
        str(SUITE),
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        marker,
        f"--junit-xml={junit}",
        f"--rootdir={ROOT}",
    ]


def suite_env(inventory_file: Path, host: str | None) -> dict[str, str]:
    env = dict(os.environ, **{inv.INVENTORY_ENV: str(inventory_file)})
    env.pop(inv.HOST_ENV, None)
    if host is not None:
        env[inv.HOST_ENV] = host
    return env


def run_suite(inventory_file: Path, workdir: Path) -> Outcome:
    """The whole suite in one pytest (real clusters: testinfra reaches each host itself)."""
    junit = workdir / "junit.xml"
    started = time.monotonic()
    try:
        subprocess.run(
            pytest_command(junit, deployed=True),
            env=suite_env(inventory_file, None),
            cwd=ROOT,
            timeout=SUITE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise VerifyError(f"the suite did not finish within {SUITE_TIMEOUT_S:g} s") from None
    outcome = read_junit(junit, time.monotonic() - started)
    return outcome if outcome != NO_TESTS else Outcome(0, 1, 0, outcome.seconds)


def read_junit(path: Path, seconds: float) -> Outcome:
    if not path.exists():
        return NO_TESTS
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return Outcome(total - failed - skipped, failed, skipped, seconds)


# --------------------------------------------------------------------------- rehearsal


def verify_rehearsal(state_dir: Path, settings: Settings, path: Path) -> Outcome:
    inventory_file = Layout(state_dir.resolve()).inventory
    if not inventory_file.exists():
        raise VerifyError(
            f"no rehearsal is running in {state_dir} (no inventory.json): start one with "
            f"`make rehearse STACK={settings.stack}` or `python -m scripts.rehearse --stack "
            f"{settings.stack} --detach`"
        )
    inventory = inv.load(inventory_file)
    if inventory.stack != settings.stack:
        raise VerifyError(
            f"the rehearsal in {state_dir} runs stack {inventory.stack}, not {settings.stack}"
        )
    if inventory.extra.get("config_hash") != config_hash(path):
        raise VerifyError(
            f"{path.name} changed since the rehearsal started: restart it "
            "(`make rehearse-down`, then `make rehearse`) so it runs the current config"
        )
    if shutil.which("ip") is None or os.geteuid() != 0:
        raise VerifyError("verifying a rehearsal needs root and `ip` (ip netns exec)")
    return run_per_host(inventory, inventory_file)


@dataclass
class _HostRun:
    host: inv.Host
    proc: subprocess.Popen[bytes]
    junit: Path
    log: Path
    started: float


def run_per_host(inventory: inv.Inventory, inventory_file: Path) -> Outcome:
    """One pytest per host, inside its namespace, PARALLEL_HOSTS at a time."""
    total = NO_TESTS
    started = time.monotonic()
    running: list[_HostRun] = []
    with tempfile.TemporaryDirectory(prefix="qvr-verify-") as tmp:
        pending = list(inventory.hosts)
        try:
            while pending or running:
                while pending and len(running) < PARALLEL_HOSTS:
                    running.append(_start_host(pending.pop(0), inventory_file, Path(tmp)))
                for run in list(running):
                    if run.proc.poll() is None and time.monotonic() - run.started < HOST_TIMEOUT_S:
                        continue
                    running.remove(run)
                    total += _finish_host(run)
                time.sleep(0.1)
        finally:
            for run in running:  # interrupted: stop the rest, and reap them
                run.proc.kill()
                run.proc.wait(timeout=30)
    return Outcome(total.passed, total.failed, total.skipped, time.monotonic() - started)


def _start_host(host: inv.Host, inventory_file: Path, tmp: Path) -> _HostRun:
    if host.netns is None:
        raise VerifyError(f"rehearsal host {host.name} has no namespace in the inventory")
    junit = tmp / f"{host.name}.xml"
    log = tmp / f"{host.name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, *pytest_command(junit, deployed=False)],
            env=suite_env(inventory_file, host.name),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return _HostRun(host, proc, junit, log, time.monotonic())


def _finish_host(run: _HostRun) -> Outcome:
    timed_out = run.proc.poll() is None
    if timed_out:
        run.proc.kill()
    run.proc.wait(timeout=30)
    outcome = read_junit(run.junit, time.monotonic() - run.started)
    roles = ", ".join(run.host.roles)
    note = f" (killed after {HOST_TIMEOUT_S:g} s)" if timed_out else ""
    print(f"  {run.host.name:<24} {roles:<40} {outcome.summary()}{note}", flush=True)
    if outcome.ok and not timed_out:
        return outcome
    print(_indent(run.log.read_text(errors="replace")), flush=True)
    # A run that died before reporting (or was killed) counts as one failure.
    return outcome if outcome.failed else Outcome(outcome.passed, 1, outcome.skipped, 0.0)


def _indent(text: str) -> str:
    return "\n".join(f"      {line}" for line in text.rstrip().splitlines())


# --------------------------------------------------------------------------- kubectl


@dataclass(frozen=True)
class Kubectl:
    kubeconfig: str | None
    context: str | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Kubectl:
        if shutil.which("kubectl") is None:
            raise VerifyError(f"--target {args.target} needs kubectl on PATH")
        kubeconfig = args.kubeconfig
        if kubeconfig is None and args.outputs is not None:
            kubeconfig = _kubeconfig_from_outputs(args.outputs)
        return cls(kubeconfig, args.context)

    def base(self) -> list[str]:
        cmd = ["kubectl"]
        if self.kubeconfig:
            cmd.append(f"--kubeconfig={self.kubeconfig}")
        if self.context:
            cmd.append(f"--context={self.context}")
        return cmd

    def json(self, *args: str) -> Any:
        try:
            result = subprocess.run(
                [*self.base(), *args, "-o", "json"],
                capture_output=True,
                text=True,
                timeout=KUBECTL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise VerifyError(
                f"`kubectl {' '.join(args)}` took over {KUBECTL_TIMEOUT_S:g} s"
            ) from None
        if result.returncode != 0:
            raise VerifyError(f"`kubectl {' '.join(args)}` failed: {result.stderr.strip()}")
        return json.loads(result.stdout)

    def spec(self, pod: str, namespace: str, container: str) -> str:
        query = {"namespace": namespace, "container": container}
        if self.kubeconfig:
            query["kubeconfig"] = self.kubeconfig
        if self.context:
            query["context"] = self.context
        return f"kubectl://{pod}?{urlencode(query)}"


def _kubeconfig_from_outputs(path: Path) -> str:
    try:
        outputs = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise VerifyError(f"--outputs {path}: {err}") from None
    kubeconfig = outputs.get("kubeconfig")
    if not kubeconfig:
        raise VerifyError(f"--outputs {path} has no `kubeconfig` output")
    text = kubeconfig if isinstance(kubeconfig, str) else json.dumps(kubeconfig)
    fd, name = tempfile.mkstemp(prefix="qvr-kubeconfig-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return name


def running_pods(kubectl: Kubectl, namespace: str, selector: str) -> list[dict[str, Any]]:
    pods = kubectl.json("get", "pods", "-n", namespace, "-l", selector)["items"]
    return [p for p in pods if p["status"].get("phase") == "Running"]


def _selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items())


@contextmanager
def port_forward(kubectl: Kubectl, pod: str, namespace: str, port: int) -> Iterator[str]:
    """`kubectl port-forward` to the pod's `port`; yields http://127.0.0.1:<local port>."""
    proc = subprocess.Popen(
        [*kubectl.base(), "port-forward", "-n", namespace, f"pod/{pod}", f":{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + PORT_FORWARD_TIMEOUT_S
        line = ""
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            match = re.search(r"Forwarding from 127\.0\.0\.1:(\d+)", line)
            if match:
                yield f"http://127.0.0.1:{match[1]}"
                return
        raise VerifyError(f"kubectl port-forward to {pod}:{port} did not start: {line.strip()}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def kubectl_inventory(
    settings: Settings, kubectl: Kubectl, workdir: Path, stack: ExitStack
) -> dict[str, Any]:
    ns = settings.serving.namespace
    hosts = [
        *_gateway_hosts(settings, kubectl, stack),
        *_engine_hosts(settings, kubectl, stack),
        *_redis_hosts(settings, kubectl),
        *_prometheus_hosts(settings, kubectl, stack),
    ]
    if not hosts:
        raise VerifyError(f"no running pods of stack {settings.stack} in namespace {ns}")
    secrets_file = workdir / "secrets.json"
    fd = os.open(secrets_file, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(_cluster_secrets(settings, kubectl), f)
    return {
        "version": inv.VERSION,
        "target": "kubectl",
        "stack": settings.stack,
        "secrets_file": str(secrets_file),
        "hosts": hosts,
    }


def _gateway_hosts(settings: Settings, kubectl: Kubectl, stack: ExitStack) -> list[dict[str, Any]]:
    ns = settings.serving.namespace
    pods = running_pods(
        kubectl, ns, _selector({NAME_LABEL: GATEWAY_NAME, COMPONENT_LABEL: GATEWAY_COMPONENT})
    )
    hosts = []
    for pod in pods:
        name = pod["metadata"]["name"]
        url = stack.enter_context(port_forward(kubectl, name, ns, GATEWAY_PORT))
        roles = {inv.GATEWAY: gateway_vars(settings, "http://127.0.0.1") | {"url": url}}
        hosts.append({"name": name, "spec": kubectl.spec(name, ns, "nginx"), "roles": roles})
    return hosts


def _engine_hosts(settings: Settings, kubectl: Kubectl, stack: ExitStack) -> list[dict[str, Any]]:
    ns = settings.serving.namespace
    hosts = []
    for d in settings.serving.deployments:
        plan = plan_for(settings, d)
        group = settings.node_group(d.node_group)
        instance = instance_type(group.instance_type)
        assert plan is not None  # validated settings have a plan
        assert instance is not None  # and catalog instance types
        for pod in running_pods(kubectl, ns, _selector({LWS_NAME_LABEL: lws_name(d.name)})):
            labels = pod["metadata"]["labels"]
            name = pod["metadata"]["name"]
            engine = EnginePod(
                d, int(labels[LWS_GROUP_INDEX_LABEL]), int(labels[LWS_WORKER_INDEX_LABEL])
            )
            roles = engine_roles(settings, engine, "http://127.0.0.1")
            if engine.rank == 0:
                url = stack.enter_context(port_forward(kubectl, name, ns, VLLM_PORT))
                roles[inv.ENGINE_LEADER] = dict(roles[inv.ENGINE_LEADER]) | {"url": url}
            roles[inv.ENGINE_POD] = {
                "gpus": instance.gpus,
                "efa_devices": instance.efa_interfaces if group.efa else 0,
                "min_shm_bytes": shm_size_bytes(d, plan.min_shm_bytes),
            }
            hosts.append({"name": name, "spec": kubectl.spec(name, ns, "vllm"), "roles": roles})
    return hosts


def _redis_hosts(settings: Settings, kubectl: Kubectl) -> list[dict[str, Any]]:
    if not settings.redis.enabled:
        return []
    ns = settings.serving.namespace
    roles = {
        inv.REDIS: {"port": REDIS_PORT, "exporter_port": REDIS_EXPORTER_PORT, "user": EXPORTER_USER}
    }
    return [
        {
            "name": p["metadata"]["name"],
            "spec": kubectl.spec(p["metadata"]["name"], ns, "redis"),
            "roles": roles,
        }
        for p in running_pods(kubectl, ns, _selector({NAME_LABEL: REDIS_NAME}))
    ]


def _prometheus_hosts(
    settings: Settings, kubectl: Kubectl, stack: ExitStack
) -> list[dict[str, Any]]:
    if not settings.monitoring.enabled:
        return []
    hosts = []
    for pod in running_pods(kubectl, MONITORING_NAMESPACE, _selector(PROMETHEUS_POD_LABELS)):
        name = pod["metadata"]["name"]
        url = stack.enter_context(
            port_forward(kubectl, name, MONITORING_NAMESPACE, PROMETHEUS_PORT)
        )
        roles = {
            inv.PROMETHEUS: {
                "url": url,
                "port": PROMETHEUS_PORT,
                "rule_groups": [g["name"] for g in build_alert_rules(settings)["groups"]],
            }
        }
        spec = kubectl.spec(name, MONITORING_NAMESPACE, "prometheus")
        hosts.append({"name": name, "spec": spec, "roles": roles})
    return hosts


def _secret_entry(kubectl: Kubectl, namespace: str, secret: str, key: str) -> str:
    data = kubectl.json("get", "secret", "-n", namespace, secret)["data"]
    if key not in data:
        raise VerifyError(f"Secret {namespace}/{secret} has no entry {key}")
    return base64.b64decode(data[key]).decode()


def _cluster_secrets(settings: Settings, kubectl: Kubectl) -> dict[str, str]:
    """The credentials the checks need, read from the stack's Kubernetes Secrets."""
    ns = settings.serving.namespace
    key_map = _secret_entry(kubectl, ns, GATEWAY_KEYS_SECRET, API_KEYS_FILE)
    keys = {m[2]: m[1] for m in re.finditer(r'"Bearer ([^"]+)" "([^"]+)";', key_map)}
    key_id = settings.gateway.api_key_ids[0]
    d = settings.serving.deployments[0]
    secrets = {
        "gateway_key_id": key_id,
        "gateway_api_key": keys[key_id],
        "engine_api_key": _secret_entry(
            kubectl, ns, engine_secret_name(d.name), ENGINE_API_KEY_ENTRY
        ),
    }
    if settings.redis.enabled:
        secrets["redis_exporter_password"] = _secret_entry(
            kubectl, ns, REDIS_CONFIG_SECRET, EXPORTER_PASSWORD_ENTRY
        )
    return secrets


# --------------------------------------------------------------------------- ssh


def ssh_inventory(settings: Settings, kubectl: Kubectl, args: argparse.Namespace) -> dict[str, Any]:
    """Every node of the cluster, found through the API (nodes come and go with their
    autoscaling groups, so their addresses are not stack outputs)."""
    nodes = kubectl.json("get", "nodes")["items"]
    if not nodes:
        raise VerifyError("the cluster has no nodes")
    groups = {g.name: g for g in settings.gpu_node_groups}
    hosts = []
    for node in nodes:
        labels = node["metadata"]["labels"]
        address = next(
            a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP"
        )
        instance = instance_type(labels.get(INSTANCE_TYPE_LABEL, ""))
        if instance is None:
            raise VerifyError(f"node {node['metadata']['name']}: instance type not in the catalog")
        roles: dict[str, Any] = {
            inv.NODE: node_vars(
                conf_path=CHRONY_CONF_PATH,
                conf=render_chrony_conf(phc=supports_phc(instance, settings.region)),
                chronyc=[],
                sources=[AMAZON_TIME_SYNC_SERVER, PHC_SOURCE],
            )
        }
        group = groups.get(labels.get(NODE_GROUP_LABEL, ""))
        if group is not None:
            roles[inv.GPU_NODE] = {
                "gpus": instance.gpus,
                "efa_devices": instance.efa_interfaces if group.efa else 0,
                "hugepages_mib": int(EFA_HUGEPAGES.removesuffix("Mi")) if group.efa else 0,
            }
        hosts.append(
            {"name": node["metadata"]["name"], "spec": _ssh_spec(address, args), "roles": roles}
        )
    return {"version": inv.VERSION, "target": "ssh", "stack": settings.stack, "hosts": hosts}


def _ssh_spec(address: str, args: argparse.Namespace) -> str:
    query: dict[str, str] = {}
    if args.ssh_config:
        query["ssh_config"] = args.ssh_config
    if args.ssh_identity_file:
        query["ssh_identity_file"] = args.ssh_identity_file
    if args.sudo:
        query["sudo"] = "true"
    user = f"{args.ssh_user}@" if args.ssh_user else ""
    return f"ssh://{user}{address}" + (f"?{urlencode(query)}" if query else "")


if __name__ == "__main__":
    sys.exit(main())
