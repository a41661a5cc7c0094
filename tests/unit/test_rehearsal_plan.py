"""The rehearsal's plan against what the cluster gets: only the documented substitutions differ.

Each test renders the cluster's version with the same renderer or builder the Pulumi
components use, maps the rehearsal's paths back to the cluster's, and checks that the
remaining differences are exactly the lines SUBSTITUTIONS names. No root needed.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from components.nginx_conf import build_nginx_conf_args, render_nginx_conf
from components.redis_conf import RedisConf, render_redis_conf
from components.time_sync import render_chrony_conf
from components.vllm_command import WORKER, build_vllm_command
from components.vllm_pods import build_pod_template
from scripts.rehearsal import inventory as inv
from scripts.rehearsal import plan as P
from stacks.engines import spec_for
from stacks.schema import Settings
from stacks.settings import load_stack_file, stack_file
from tests.infra.probes import _address

ROOT = Path(__file__).resolve().parents[2]
STATE = Path("/srv/rehearsal")
LAYOUT = P.Layout(STATE)


def settings_of(stack: str) -> Settings:
    return load_stack_file(stack_file(stack))


def plan_of(
    stack: str, max_groups: int = 1, corruptions: tuple[P.Corruption, ...] = ()
) -> tuple[P.RehearsalPlan, P.RunSecrets, Settings]:
    settings = settings_of(stack)
    secrets = P.generate_secrets(settings)
    options = P.Options(run=stack, layout=LAYOUT, max_groups=max_groups, corruptions=corruptions)
    return P.plan_rehearsal(settings, secrets, options), secrets, settings


def changed_lines(cluster: str, rehearsal: str) -> list[str]:
    """The -/+ lines of a diff without context."""
    diff = difflib.unified_diff(cluster.splitlines(), rehearsal.splitlines(), lineterm="", n=0)
    return [line for line in diff if line[:1] in "-+" and line[:3] not in ("---", "+++")]


def file_text(plan: P.RehearsalPlan, path: Path) -> str:
    return next(f.text for f in plan.files if f.path == path)


def process(plan: P.RehearsalPlan, name: str) -> P.ProcessSpec:
    return next(p for p in plan.processes if p.name == name)


# --------------------------------------------------------------------------- the table


def test_the_docs_print_the_substitution_table() -> None:
    docs = (ROOT / "docs" / "rehearsal.md").read_text()
    assert P.substitution_table() in docs


def test_rehearse_prints_the_same_table() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "rehearse.py"), "substitutions"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout == P.substitution_table()


# --------------------------------------------------------------------------- user mistakes


def rehearse(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "rehearse.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_an_unknown_stack_is_one_message(tmp_path: Path) -> None:
    result = rehearse("--stack", "nosuch", "--state-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr == (
        f"rehearse: {ROOT}/Pulumi.nosuch.yaml: 1 configuration problem(s):\n"
        "  - file: no such stack file\n"
    )


def test_an_invalid_stack_file_names_the_setting(tmp_path: Path) -> None:
    bad = tmp_path / "Pulumi.bad.yaml"
    bad.write_text("config:\n  qwen-vl-serving:region: 12\n")
    result = rehearse("--stack", str(bad), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 1
    assert result.stderr.startswith(f"rehearse: {bad}: ")
    assert "  - serving: required" in result.stderr
    assert "Traceback" not in result.stderr


def test_down_with_nothing_to_do(tmp_path: Path) -> None:
    result = rehearse("down", "--state-dir", str(tmp_path / "none"))
    if os.geteuid() == 0:
        assert (result.returncode, result.stdout) == (
            0,
            f"nothing to tear down in {tmp_path}/none\n",
        )
    else:
        assert result.returncode == 1
        assert (
            result.stderr
            == "rehearse: the rehearsal needs root (network namespaces, ip netns exec)\n"
        )


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="drops root")
@pytest.mark.parametrize("command", ["status", "down"])
def test_status_and_down_as_another_user_say_root_is_needed(command: str) -> None:
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    result = subprocess.run(
        [*nobody, sys.executable, str(ROOT / "scripts" / "rehearse.py"), command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert (
        result.stderr == "rehearse: the rehearsal needs root (network namespaces, ip netns exec)\n"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="up checks for root before it looks for `ip`")
def test_up_without_ip_on_path_is_one_message(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    with tempfile.TemporaryDirectory(prefix="qvr-noip-") as parent:
        Path(parent).chmod(0o755)  # nginx's user must reach the state dir (pytest's is 0700)
        state = Path(parent) / "state"
        result = rehearse("--stack", "dev", "--state-dir", str(state), env={"PATH": str(empty)})
        assert not state.exists()
    assert result.returncode == 1
    assert result.stderr == "rehearse: `ip` is not on PATH: install iproute2 (`make debs`)\n"


# --------------------------------------------------------------------------- gateway


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_nginx_conf_differs_only_in_paths_and_upstream_lines(stack: str) -> None:
    plan, _, settings = plan_of(stack)
    rehearsal = file_text(plan, P.gateway_conf_path(LAYOUT, "gateway-0"))
    base = f"{STATE}/hosts/gateway-0"
    # The "gateway paths" row: map the rehearsal's directories back to the pod's.
    mapped = rehearsal.replace(f"{base}/gateway-secrets", "/etc/nginx/gateway-secrets").replace(
        f"{base}/run", "/run/gateway"
    )
    cluster = render_nginx_conf(build_nginx_conf_args(settings))
    ns = settings.serving.namespace
    health = "max_fails=2 fail_timeout=10s;"
    expected = ["-    include /run/gateway/resolver.conf;"]
    for d in settings.serving.deployments:
        expected.append(
            f"-        server {d.name}-leader.{ns}.svc.cluster.local:8000 resolve {health}"
        )
    for d in settings.serving.deployments:
        expected.append(f"+        server {d.name}-0.{d.name}.{ns}:8000 {health}")
    assert sorted(changed_lines(cluster, mapped)) == sorted(expected)


def test_more_groups_give_the_gateway_one_upstream_server_per_leader() -> None:
    plan, _, _ = plan_of("staging", max_groups=2)
    conf = file_text(plan, P.gateway_conf_path(LAYOUT, "gateway-0"))
    servers = re.findall(r"^\s+server (\S+) ", conf, re.M)
    # qwen3-vl-2b has replicas 2, qwen3-vl-32b replicas 1
    assert servers == [
        "qwen3-vl-2b-0.qwen3-vl-2b.qwen-vl:8000",
        "qwen3-vl-2b-1.qwen3-vl-2b.qwen-vl:8000",
        "qwen3-vl-32b-0.qwen3-vl-32b.qwen-vl:8000",
    ]
    assert [h.role for h in plan.hosts if h.kind == "engine"] == [
        "qwen3-vl-2b-0",
        "qwen3-vl-2b-1",
        "qwen3-vl-32b-0",
        "qwen3-vl-32b-0-1",
    ]


def test_gateway_processes_are_the_pods_commands() -> None:
    plan, _, _ = plan_of("dev")
    nginx = process(plan, "gateway-0-nginx").argv
    conf = str(P.gateway_conf_path(LAYOUT, "gateway-0"))
    # the start script's `exec nginx -e stderr -c /etc/nginx/gateway/nginx.conf`, as nobody
    assert nginx[-5:] == ("nginx", "-e", "stderr", "-c", conf)
    assert nginx[:4] == ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
    assert process(plan, "gateway-0-nginx-exporter").argv == (
        "prometheus-nginx-exporter",
        "--nginx.scrape-uri=http://127.0.0.1:8081/stub_status",
        "--web.listen-address=:9113",
    )


def test_the_gateway_includes_carry_this_runs_keys() -> None:
    plan, secrets, _ = plan_of("dev")
    secrets_dir = LAYOUT.host("gateway-0") / "gateway-secrets"
    key_map = next(f for f in plan.files if f.path == secrets_dir / "api-keys.map")
    assert key_map.mode == 0o440
    for key_id, key in secrets.client_api_keys.items():
        assert f'"Bearer {key}" "{key_id}";' in key_map.text
    auth = file_text(plan, secrets_dir / "engine-auth.conf")
    assert auth == f'proxy_set_header Authorization "Bearer {secrets.engine_api_key}";\n'


# --------------------------------------------------------------------------- engines


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_engine_argv_is_the_builders_command_with_the_stand_in(stack: str) -> None:
    plan, _, settings = plan_of(stack)
    ns = settings.serving.namespace
    engines = [p for p in plan.processes if p.pod is not None]
    assert engines
    for proc in engines:
        pod = next(p for p in P.engine_pods(settings, 1) if p.name == proc.pod)
        master = f"{pod.deployment.name}-{pod.group}.{pod.deployment.name}.{ns}"
        expected = build_vllm_command(
            pod.deployment,
            pod.role,
            rank=pod.rank if pod.role == WORKER else None,
            master_addr=master,
        )
        assert proc.argv[:4] == ("python3", str(P.STANDIN), "--join-timeout", "30")
        assert list(proc.argv[4:]) == expected[1:]
        assert expected[0] == "vllm"


def test_engine_env_is_the_pods_env_with_the_documented_values() -> None:
    plan, secrets, settings = plan_of("staging")
    d = settings.deployment("qwen3-vl-32b")
    template = build_pod_template(spec_for(settings, d), WORKER)["spec"]["containers"][0]
    literal = {v["name"]: v["value"] for v in template["env"] if "value" in v}
    worker = process(plan, "qwen3-vl-32b-0-1-engine")
    env = dict(worker.env)
    address = str(plan.network.host("qvr-staging-qwen3-vl-32b-0-1").address)
    leader = "qwen3-vl-32b-0.qwen3-vl-32b.qwen-vl"
    # Downward API, LWS and Secrets: the rows of the table.
    assert env["VLLM_HOST_IP"] == address
    assert env["NODE_RANK"] == "1"
    assert env["LWS_LEADER_ADDRESS"] == leader
    assert env["MASTER_ADDR"] == leader  # $(LWS_LEADER_ADDRESS) expanded
    assert env["VLLM_API_KEY"] == secrets.engine_api_key
    # Everything literal is untouched, the startup budget included (45 min in staging).
    assert env["VLLM_ENGINE_READY_TIMEOUT_S"] == "2700"
    for name, value in literal.items():
        if name != "MASTER_ADDR":
            assert env[name] == value, name
    extra = set(env) - set(literal) - {"VLLM_HOST_IP", "NODE_RANK", "VLLM_API_KEY", "MASTER_ADDR"}
    assert extra == {"LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "PATH", "LANG"}


def test_an_env_secret_the_rehearsal_does_not_generate_is_named() -> None:
    settings = settings_of("staging")
    # kvOffloadRedis gives every rank the Redis app password from the redis-auth Secret.
    d = replace(settings.deployment("qwen3-vl-2b"), kv_offload_redis=True)
    message = "pod qwen3-vl-2b-0: env LMCACHE_REDIS_PASSWORD needs Secret redis-auth key 'password'"
    with pytest.raises(P.PlanError, match=re.escape(message)):
        P.pod_env(settings, P.EnginePod(d, 0, 0), "10.231.0.5", P.generate_secrets(settings))


def test_a_corruption_replaces_one_flag_of_one_pod() -> None:
    hook = P.Corruption.parse("qwen3-vl-32b-0-1:--master-port=29999")
    plan, _, _ = plan_of("staging", corruptions=(hook,))
    worker = process(plan, "qwen3-vl-32b-0-1-engine")
    assert worker.argv[worker.argv.index("--master-port") + 1] == "29999"
    assert worker.note == "corrupted: --master-port 29999"
    leader = process(plan, "qwen3-vl-32b-0-engine")
    assert leader.argv[leader.argv.index("--master-port") + 1] == "29501"


@pytest.mark.parametrize(
    ("hook", "message"),
    [
        ("qwen3-vl-32b-0-1", "expected POD:--FLAG=VALUE"),
        ("qwen3-vl-32b-0-9:--node-rank=1", "no engine pod 'qwen3-vl-32b-0-9' (pods: "),
        ("qwen3-vl-2b-0:--node-rank=1", "pod qwen3-vl-2b-0 has no --node-rank in its command"),
    ],
)
def test_bad_corruptions_are_refused(hook: str, message: str) -> None:
    with pytest.raises(P.PlanError, match=re.escape(message)):
        plan_of("staging", corruptions=(P.Corruption.parse(hook),))


# --------------------------------------------------------------------------- services, nodes


def test_redis_conf_differs_only_in_its_data_directory() -> None:
    plan, secrets, settings = plan_of("staging")
    rehearsal = file_text(plan, P.redis_dir(LAYOUT) / "redis.conf")
    r = settings.redis
    # What components/redis.py renders into the cluster's Secret (its default data dir).
    cluster = render_redis_conf(
        RedisConf(
            app_password=secrets.redis_app_password,
            exporter_password=secrets.redis_exporter_password,
            admin_password=secrets.redis_admin_password,
            maxmemory_mib=r.maxmemory_mib,
            maxmemory_policy=r.maxmemory_policy,
            appendfsync=r.appendfsync,
        )
    )
    assert changed_lines(cluster, rehearsal) == [
        "-dir /data",
        f"+dir {STATE}/hosts/services/redis/data",
    ]
    redis = process(plan, "redis")
    assert redis.argv == ("redis-server", str(P.redis_dir(LAYOUT) / "redis.conf"))
    exporter = process(plan, "redis-exporter").env
    assert exporter["REDIS_ADDR"] == "redis://127.0.0.1:6379"
    assert exporter["REDIS_USER"] == "exporter"
    assert exporter["REDIS_PASSWORD"] == secrets.redis_exporter_password


def test_prod_system_nodes_lose_only_server_driftfile_and_phc_lines() -> None:
    plan, _, settings = plan_of("prod")
    rehearsal = file_text(plan, P.chrony_dir(LAYOUT, "services") / "chrony.conf")
    cluster = render_chrony_conf(phc=True)  # m7i in us-east-1 has the ENA PTP clock
    server = str(plan.network.host("qvr-prod-timeserver").address)
    assert settings.system_nodes.instance_type.startswith("m7i")
    assert changed_lines(cluster, rehearsal) == [
        "-server 169.254.169.123 prefer iburst minpoll 4 maxpoll 4",
        f"+server {server} prefer iburst minpoll 4 maxpoll 4",
        "-refclock PHC /dev/ptp_ena poll 0 delay 0.000010 prefer",
        "-driftfile /var/lib/chrony/drift",
        f"+driftfile {STATE}/hosts/services/chrony/drift",
    ]


def test_every_node_runs_chronyd_without_clock_control_and_a_node_exporter() -> None:
    plan, _, _ = plan_of("staging")
    nodes = [h.role for h in plan.hosts if h.node]
    assert nodes == [
        "gateway-0",
        "gateway-1",
        "services",
        "qwen3-vl-2b-0",
        "qwen3-vl-32b-0",
        "qwen3-vl-32b-0-1",
    ]
    for role in nodes:
        chronyd = process(plan, f"{role}-chronyd").argv
        assert chronyd[:3] == ("chronyd", "-x", "-d")
        assert f"include {P.chrony_dir(LAYOUT, role)}/chrony.conf" in chronyd
        assert process(plan, f"{role}-node-exporter").argv[0] == "prometheus-node-exporter"
    timeserver = process(plan, "timeserver-chronyd").argv
    assert timeserver[:3] == ("chronyd", "-x", "-d")


def test_hosts_answer_to_the_clusters_names() -> None:
    plan, _, _ = plan_of("staging")
    names = {h.role: h.names for h in plan.hosts}
    assert names["qwen3-vl-32b-0"] == (
        "qwen3-vl-32b-0",
        "qwen3-vl-32b-0.qwen3-vl-32b.qwen-vl",
        "qwen3-vl-32b-leader.qwen-vl.svc.cluster.local",
    )
    assert names["qwen3-vl-32b-0-1"] == (
        "qwen3-vl-32b-0-1",
        "qwen3-vl-32b-0-1.qwen3-vl-32b.qwen-vl",
    )
    assert names["services"] == (
        "services",
        "redis.qwen-vl.svc.cluster.local",
        "monitoring-prometheus.monitoring.svc.cluster.local",
    )
    assert names["gateway-0"] == ("gateway-0", "gateway.qwen-vl.svc.cluster.local")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_rehearsal_prometheus_config(tmp_path: Path) -> None:
    layout = P.Layout(tmp_path)
    settings = settings_of("staging")
    plan = P.plan_rehearsal(
        settings, P.generate_secrets(settings), P.Options(run="staging", layout=layout)
    )
    for spec in plan.files:
        if spec.path.parent == P.prometheus_dir(layout):
            spec.path.parent.mkdir(parents=True, exist_ok=True)
            spec.path.write_text(spec.text)
    config = P.prometheus_dir(layout) / "prometheus.yml"
    result = subprocess.run(
        ["promtool", "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr


# --------------------------------------------------------------------------- inventory


def test_the_inventory_gives_each_host_its_roles() -> None:
    plan, _, _ = plan_of("staging")
    inventory = inv.parse(json.loads(json.dumps(plan.inventory)))
    roles = {h.name: sorted(h.roles) for h in inventory.hosts}
    assert roles == {
        "gateway-0": ["gateway", "node"],
        "gateway-1": ["gateway", "node"],
        "services": ["node", "prometheus", "redis"],
        "qwen3-vl-2b-0": ["engine-leader", "node"],
        "qwen3-vl-32b-0": ["engine-leader", "node"],
        "qwen3-vl-32b-0-1": ["engine-worker", "node"],
    }
    worker = inventory.host("qwen3-vl-32b-0-1").roles["engine-worker"]
    assert (worker["rank"], worker["nnodes"], worker["master_port"]) == (1, 2, 29501)
    prometheus = inventory.host("services").roles["prometheus"]
    # 6 nodes, 2 gateways, 1 Redis, 2 leaders
    assert prometheus["targets"] == {
        "vllm": 2,
        "nginx-exporter": 2,
        "node-exporter": 6,
        "redis-exporter": 1,
    }


def test_role_modules_map_to_roles() -> None:
    assert inv.module_role("test_engine_leader.py") == inv.ENGINE_LEADER
    assert inv.module_role("test_gpu_node.py") == inv.GPU_NODE
    assert inv.module_role("test_probes.py") is None
    assert inv.module_role("conftest.py") is None


@pytest.mark.parametrize(
    ("text", "address", "port"),
    [
        ("0100007F:1F90", "127.0.0.1", 8080),
        ("0600E70A:7331", "10.231.0.6", 29489),
        ("0000000000000000FFFF00000100007F:0050", "127.0.0.1", 80),
        ("00000000000000000000000001000000:0050", "::1", 80),
    ],
)
def test_proc_net_tcp_addresses_are_decoded(text: str, address: str, port: int) -> None:
    ip, decoded_port = _address(text)
    assert (str(ip), decoded_port) == (address, port)
