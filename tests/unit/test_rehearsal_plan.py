"""The rehearsal's plan against what the cluster gets: only the documented substitutions differ.

Each test renders the cluster's version with the same renderer or builder the Pulumi
components use, maps the rehearsal's paths back to the cluster's, and checks that the
remaining differences are exactly the lines SUBSTITUTIONS names. No root needed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from components.render.nginx_conf import build_nginx_conf_args, render_nginx_conf, sidecar_enabled
from components.render.redis_conf import RedisConf, render_redis_conf
from components.render.time_sync import render_chrony_conf
from components.render.vllm_command import WORKER
from components.render.vllm_pods import build_pod_template
from program.engines import spec_for
from scripts.rehearsal import inventory as inv
from scripts.rehearsal import plan as P
from tests.infra.probes import _address
from tests.support.rehearsal_plan import LAYOUT, STATE, plan_of, settings_of


def changed_lines(cluster: str, rehearsal: str) -> list[str]:
    """The -/+ lines of a diff without context."""
    diff = difflib.unified_diff(cluster.splitlines(), rehearsal.splitlines(), lineterm="", n=0)
    return [line for line in diff if line[:1] in "-+" and line[:3] not in ("---", "+++")]


def file_text(plan: P.RehearsalPlan, path: Path) -> str:
    return next(f.text for f in plan.files if f.path == path)


def process(plan: P.RehearsalPlan, name: str) -> P.ProcessSpec:
    return next(p for p in plan.processes if p.name == name)


def without_servers(conf: str) -> str:
    """The config without its upstream servers and per-engine upstreams (which list them)."""
    conf = re.sub(r"\n    upstream engine-[^ ]+\.\d+ \{.*?\n    \}\n", "\n", conf, flags=re.S)
    conf = re.sub(r"^ +server \S+ .*;\n", "", conf, flags=re.M)
    return "\n".join(line for line in conf.splitlines() if line.strip())


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_nginx_conf_differs_only_in_paths_and_upstream_lines(stack: str) -> None:
    plan, _, settings = plan_of(stack)
    rehearsal = file_text(plan, P.gateway_conf_path(LAYOUT, "gateway-0"))
    base = f"{STATE}/hosts/gateway-0"
    # The "gateway paths" row: map the rehearsal's directories back to the pod's.
    mapped = (
        rehearsal.replace(f"{base}/gateway-secrets", "/etc/nginx/gateway-secrets")
        .replace(f"{base}/run", "/run/gateway")
        .replace(f"{base}/nginx", "/etc/nginx/gateway")
    )
    # The rehearsal runs no encoder tier (its engines drop --ec-transfer-config, see
    # SUBSTITUTIONS): compare with the cluster's config of the same stack without it.
    aggregated = tuple(
        dataclasses.replace(d, vision=dataclasses.replace(d.vision, mode="aggregated"))
        for d in settings.serving.deployments
    )
    settings = dataclasses.replace(
        settings, serving=dataclasses.replace(settings.serving, deployments=aggregated)
    )
    cluster = render_nginx_conf(build_nginx_conf_args(settings))
    assert changed_lines(without_servers(cluster), without_servers(mapped)) == [
        "-    include /run/gateway/resolver.conf;"
    ]
    ns = settings.serving.namespace
    health = "max_fails=2 fail_timeout=10s;"
    servers = re.findall(r"^ +server ([^{\n]*)$", mapped, re.M)
    leaders = [f"{d.name}-0.{d.name}.{ns}:8000 {health}" for d in settings.serving.deployments]
    # One group rehearsed: the deployment's upstream, and (affinity) its one engine's.
    per_engine = 2 if settings.gateway.load_balancing == "sessionAffinity" else 1
    args = build_nginx_conf_args(settings)
    sidecar = [f"{args.quota_address};"] if sidecar_enabled(args) else []
    assert sorted(servers) == sorted(leaders * per_engine + sidecar)


def test_more_groups_give_the_gateway_one_upstream_server_per_leader() -> None:
    plan, _, _ = plan_of("staging", max_groups=2)
    conf = file_text(plan, P.gateway_conf_path(LAYOUT, "gateway-0"))
    upstream = conf.split("upstream engine-qwen3-vl-2b {")[1].split("}")[0]
    servers = re.findall(r"^\s+server (\S+) ", upstream, re.M)
    # qwen3-vl-2b has replicas 2, qwen3-vl-32b replicas 1
    assert servers == [
        "qwen3-vl-2b-0.qwen3-vl-2b.qwen-vl:8000",
        "qwen3-vl-2b-1.qwen3-vl-2b.qwen-vl:8000",
    ]
    # Session affinity: each leader's own upstream, the other leader as its backup.
    second = conf.split("upstream engine-qwen3-vl-2b.1 {")[1].split("}")[0]
    assert re.findall(r"^\s+server (\S+) .*?( backup)?;", second, re.M) == [
        ("qwen3-vl-2b-1.qwen3-vl-2b.qwen-vl:8000", ""),
        ("qwen3-vl-2b-0.qwen3-vl-2b.qwen-vl:8000", " backup"),
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
    # sid's nginx (njs), unprivileged, seeing the rehearsal's state directory
    assert nginx[:5] == (str(P.SID_NGINX), "--user", "nobody:nogroup", str(STATE), "--")
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
        "gateway-router": 2,
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
