"""The gateway's Kubernetes objects per stack (the real program under mocks), its pod's start script run by a real shell, its NLB annotations and the gateway settings rules.

This module: the Pulumi program under mocks. The other layers' tests of the same code:
tests/artifacts/test_gateway.py, tests/unit/test_gateway.py.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import yaml

from components.render.nginx_conf import (
    API_KEYS_FILE,
    ENGINE_AUTH_FILE,
    QUOTA_SOURCE,
    build_nginx_conf_args,
    render_api_keys_map,
    render_engine_auth,
    render_nginx_conf,
    render_routes_js,
    router_source,
)
from stacks.naming import GATEWAY_KEYS_SECRET
from stacks.schema import Settings
from stacks.settings import load_stack_file, stack_file
from tests.support.gateway import LB, STACKS, TLS_ARN
from tests.support.harness import (
    Resource,
    StackRun,
    mock_load_balancer_host,
    mock_password,
    run_stack,
)
from tests.support.manifests import plain


@pytest.fixture(scope="module", params=STACKS)
def stack(request: pytest.FixtureRequest) -> tuple[Settings, StackRun]:
    name = request.param
    return load_stack_file(stack_file(name)), run_stack(name)


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, StackRun]:
    """dev, internet-facing behind a TLS listener, with a longer read timeout."""
    document = yaml.safe_load(stack_file("dev").read_text())
    document["config"]["qwen-vl-serving:gateway"].update(
        scheme="internet-facing", tlsCertificateArn=TLS_ARN, readTimeoutSeconds=900
    )
    path = tmp_path_factory.mktemp("tls") / "Pulumi.dev.yaml"
    path.write_text(yaml.safe_dump(document))
    return load_stack_file(path), run_stack("dev", path)


def gateway_resources(run: StackRun) -> list[Resource]:
    component = next(r for r in run.resources if r.type == "qwen-vl-serving:gateway:Gateway")
    return [r for r in run.resources if r.parent == component.urn]


def one(run: StackRun, typ: str, role: str) -> dict[str, Any]:
    return plain(run.one(f"kubernetes:{typ}", f"gateway-{role}").inputs)


def pod(run: StackRun) -> dict[str, Any]:
    return one(run, "apps/v1:Deployment", "deployment")["spec"]["template"]


def container(run: StackRun, name: str) -> dict[str, Any]:
    return next(c for c in pod(run)["spec"]["containers"] if c["name"] == name)


def test_the_configmap_holds_the_rendered_cluster_config(stack: tuple[Settings, StackRun]) -> None:
    settings, run = stack
    config_map = one(run, "core/v1:ConfigMap", "config")
    assert config_map["metadata"] == {
        "name": "gateway-nginx",
        "namespace": "qwen-vl",
        "labels": config_map["metadata"]["labels"],
    }
    args = build_nginx_conf_args(settings)
    assert config_map["data"] == {
        "nginx.conf": render_nginx_conf(args),
        # The routing tier (njs) and its data, and the quota sidecar, from the same volume.
        "router.js": router_source(),
        "routes.js": render_routes_js(args),
        "quota.py": QUOTA_SOURCE.read_text(),
    }
    conf = config_map["data"]["nginx.conf"]
    assert "js_path /etc/nginx/gateway;" in conf
    assert "js_import router from router.js;" in conf


def test_upstreams_are_the_engine_stages_leader_services(stack: tuple[Settings, StackRun]) -> None:
    _, run = stack
    conf = one(run, "core/v1:ConfigMap", "config")["data"]["nginx.conf"]
    engines = run.outputs["engines"]
    assert engines
    for name, endpoint in engines.items():
        assert f"server {endpoint['leader_service_host']}:8000 resolve " in conf, name


def test_keys_live_in_the_secret_only(stack: tuple[Settings, StackRun]) -> None:
    settings, run = stack
    secret = one(run, "core/v1:Secret", "keys")
    keys = {k: mock_password(f"gateway-key-{k}") for k in settings.gateway.api_key_ids}
    assert secret["metadata"]["name"] == GATEWAY_KEYS_SECRET
    assert secret["stringData"] == {
        API_KEYS_FILE: render_api_keys_map(keys),
        ENGINE_AUTH_FILE: render_engine_auth(mock_password("engine-api-key")),
    }
    values = [*keys.values(), mock_password("engine-api-key")]
    for resource in gateway_resources(run):
        if resource.type != "kubernetes:core/v1:Secret":
            text = str(plain(resource.inputs))
            assert not [v for v in values if v in text], resource.name
    volumes = {v["name"]: v for v in pod(run)["spec"]["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == GATEWAY_KEYS_SECRET
    items = volumes["keys"]["secret"]["items"]
    assert {i["key"] for i in items} == {"api-keys.map", "engine-auth.conf"}
    # nginx finds each file where the pod mounts the Secret and the config includes it.
    mount = next(m for m in container(run, "nginx")["volumeMounts"] if m["name"] == "keys")
    conf = one(run, "core/v1:ConfigMap", "config")["data"]["nginx.conf"]
    for item in items:
        assert f"include {mount['mountPath']}/{item['path']};" in conf
    assert volumes["keys"]["secret"]["defaultMode"] == 0o440
    assert volumes["config"]["configMap"]["name"] == "gateway-nginx"


def test_the_secret_files_are_marked_secret(stack: tuple[Settings, StackRun]) -> None:
    _, run = stack
    raw = run.one("kubernetes:core/v1:Secret", "gateway-keys").inputs["stringData"]
    assert raw != plain(raw)  # wrapped by pulumi as a secret value


def test_the_deployment_runs_nginx_and_the_exporter_on_system_nodes(
    stack: tuple[Settings, StackRun],
) -> None:
    settings, run = stack
    deployment = one(run, "apps/v1:Deployment", "deployment")
    assert deployment["metadata"]["name"] == "gateway"
    assert deployment["spec"]["replicas"] == {"dev": 1, "staging": 2, "prod": 3}[settings.stack]
    spec = pod(run)["spec"]
    assert spec["nodeSelector"] == {"qwen-vl-serving/role": "system"}
    assert spec["terminationGracePeriodSeconds"] == 10 + 600
    nginx, exporter = container(run, "nginx"), container(run, "exporter")
    assert nginx["image"] == settings.gateway.image
    assert exporter["image"] == settings.gateway.exporter_image
    assert nginx["ports"] == [
        {"name": "http", "containerPort": 8080},
        {"name": "router-metrics", "containerPort": 9145},
    ]
    # No stack sets a quota; the sidecar shares session placements where 2+ replicas run.
    sidecar = ["quota"] if settings.gateway.replicas > 1 else []
    assert [c["name"] for c in spec["containers"]] == ["nginx", "exporter", *sidecar]
    assert nginx["command"][-1].endswith("exec nginx -e stderr -c /etc/nginx/gateway/nginx.conf\n")
    assert exporter["args"] == [
        "--nginx.scrape-uri=http://127.0.0.1:8081/stub_status",
        "--web.listen-address=:9113",
    ]
    assert exporter["ports"] == [{"name": "metrics", "containerPort": 9113}]
    mounts = {m["name"]: m["mountPath"] for m in nginx["volumeMounts"]}
    assert mounts == {
        "config": "/etc/nginx/gateway",
        "keys": "/etc/nginx/gateway-secrets",
        "runtime": "/run/gateway",
    }


def test_probes_ask_nginx_itself(stack: tuple[Settings, StackRun]) -> None:
    _, run = stack
    nginx = container(run, "nginx")
    for probe in ("readinessProbe", "livenessProbe"):
        assert nginx[probe]["httpGet"] == {"path": "/healthz", "port": "http"}


def test_pods_spread_over_zones_and_run_unprivileged(stack: tuple[Settings, StackRun]) -> None:
    _, run = stack
    template = pod(run)
    selector = one(run, "apps/v1:Deployment", "deployment")["spec"]["selector"]["matchLabels"]
    zone = next(
        c
        for c in template["spec"]["topologySpreadConstraints"]
        if c["topologyKey"] == "topology.kubernetes.io/zone"
    )
    assert (zone["maxSkew"], zone["whenUnsatisfiable"]) == (1, "DoNotSchedule")
    assert zone["labelSelector"]["matchLabels"] == selector
    assert selector.items() <= template["metadata"]["labels"].items()
    security = template["spec"]["securityContext"]
    assert security["runAsNonRoot"]
    assert security["runAsUser"] == 101
    for c in template["spec"]["containers"]:
        assert c["securityContext"]["readOnlyRootFilesystem"]
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_checksums_roll_the_pods_on_any_change(
    stack: tuple[Settings, StackRun], tls_stack: tuple[Settings, StackRun]
) -> None:
    _, run = stack
    annotations = pod(run)["metadata"]["annotations"]
    data = one(run, "core/v1:ConfigMap", "config")["data"]
    files = one(run, "core/v1:Secret", "keys")["stringData"]
    every_file = "".join(data[f] for f in ("nginx.conf", "router.js", "routes.js", "quota.py"))
    assert annotations["checksum/config"] == hashlib.sha256(every_file.encode()).hexdigest()
    expected_secrets = files[API_KEYS_FILE] + files[ENGINE_AUTH_FILE]
    assert annotations["checksum/secrets"] == hashlib.sha256(expected_secrets.encode()).hexdigest()
    # The annotation is not a secret: otherwise every preview would hide the whole spec.
    raw = run.one("kubernetes:apps/v1:Deployment", "gateway-deployment").inputs
    assert raw["spec"] == plain(raw["spec"])
    if run.stack == "dev":  # same stack, another read timeout: another checksum
        other = pod(tls_stack[1])["metadata"]["annotations"]["checksum/config"]
        assert other != annotations["checksum/config"]


def test_the_pdb_keeps_all_but_one_pod(stack: tuple[Settings, StackRun]) -> None:
    _, run = stack
    pdb = one(run, "policy/v1:PodDisruptionBudget", "pdb")
    selector = one(run, "apps/v1:Deployment", "deployment")["spec"]["selector"]
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": selector}


def test_in_cluster_clients_get_a_clusterip_service(stack: tuple[Settings, StackRun]) -> None:
    _, run = stack
    service = one(run, "core/v1:Service", "service")
    assert service["metadata"]["name"] == "gateway"  # gateway_internal_url resolves to it
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http"}]
    assert run.outputs["gateway_internal_url"] == "http://gateway.qwen-vl.svc.cluster.local"


def test_an_internal_nlb_in_every_stack_file(stack: tuple[Settings, StackRun]) -> None:
    settings, run = stack
    nlb = one(run, "core/v1:Service", "nlb")
    annotations = nlb["metadata"]["annotations"]
    assert annotations[f"{LB}type"] == "nlb"
    assert annotations[f"{LB}internal"] == "true"
    assert annotations[f"{LB}cross-zone-load-balancing-enabled"] == "true"
    assert f"{LB}ssl-cert" not in annotations
    assert f"stack={settings.stack}" in annotations[f"{LB}additional-resource-tags"].split(",")
    assert nlb["spec"]["type"] == "LoadBalancer"
    assert nlb["spec"]["externalTrafficPolicy"] == "Local"
    assert nlb["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http"}]
    host = mock_load_balancer_host("gateway-nlb")
    assert run.outputs["gateway_load_balancer_host"] == host
    assert run.outputs["gateway_url"] == f"http://{host}"


def test_tls_puts_an_acm_listener_on_an_internet_facing_nlb(
    tls_stack: tuple[Settings, StackRun],
) -> None:
    _, run = tls_stack
    nlb = one(run, "core/v1:Service", "nlb")
    annotations = nlb["metadata"]["annotations"]
    assert f"{LB}internal" not in annotations
    assert annotations[f"{LB}ssl-cert"] == TLS_ARN
    assert annotations[f"{LB}ssl-ports"] == "443"
    assert annotations[f"{LB}ssl-negotiation-policy"].startswith("ELBSecurityPolicy-TLS13")
    assert nlb["spec"]["ports"] == [{"name": "https", "port": 443, "targetPort": "http"}]
    assert run.outputs["gateway_url"] == f"https://{mock_load_balancer_host('gateway-nlb')}"
    assert (
        "proxy_read_timeout 900s;" in one(run, "core/v1:ConfigMap", "config")["data"]["nginx.conf"]
    )


def test_client_keys_are_a_stack_output(stack: tuple[Settings, StackRun]) -> None:
    settings, run = stack
    assert run.outputs["gateway_api_keys"] == {
        k: mock_password(f"gateway-key-{k}") for k in settings.gateway.api_key_ids
    }


def test_every_gateway_object_uses_the_cluster_provider(stack: tuple[Settings, StackRun]) -> None:
    _, run = stack
    resources = gateway_resources(run)
    assert {r.type.split(":")[-1] for r in resources} == {
        "ConfigMap",
        "Secret",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
    }
    providers = {r.provider for r in resources}
    assert len(providers) == 1
    assert "pulumi:providers:kubernetes::k8s::" in providers.pop()
    deployment = run.one("kubernetes:apps/v1:Deployment", "gateway-deployment")
    system = next(r for r in run.resources if r.name == "eks-system")
    assert system.urn in deployment.dependencies  # pods wait for the system node group
