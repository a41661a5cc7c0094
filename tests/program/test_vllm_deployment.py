"""The engines stage under Pulumi mocks: what the real program registers for each stack."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from components.render.vllm_command import expand_k8s_vars, resolve_env
from stacks.naming import LWS_WORKER_INDEX_LABEL, leader_address
from stacks.settings import ROOT, load_stack_file
from tests.support.engines import container, pod_templates
from tests.support.harness import MOCK_SECRET, StackRun, mock_password, run_stack
from tests.support.manifests import SECRET_SIG_KEY, documents, manifest, validate

STACKS = ("dev", "staging", "prod")
LWS_TYPE = "kubernetes:leaderworkerset.x-k8s.io/v1:LeaderWorkerSet"
SERVICE_TYPE = "kubernetes:core/v1:Service"
SECRET_TYPE = "kubernetes:core/v1:Secret"
COMPONENT_TYPE = "qwen-vl-serving:engines:VllmDeployment"
# The multi-node deployment of each stack (None: dev has only single-GPU engines).
MULTI_NODE = {"dev": None, "staging": "qwen3-vl-32b", "prod": "qwen3-vl-235b"}


@pytest.fixture(scope="module", params=STACKS)
def run(request: pytest.FixtureRequest) -> StackRun:
    return run_stack(request.param)


def lws_of(run: StackRun, deployment: str) -> dict[str, Any]:
    return manifest(run.one(LWS_TYPE, f"{deployment}-lws"))


def test_one_component_with_secret_lws_and_leader_service_per_deployment(run: StackRun) -> None:
    names = [d.name for d in load_stack_file(ROOT / f"Pulumi.{run.stack}.yaml").serving.deployments]
    assert sorted(r.name for r in run.of_type(COMPONENT_TYPE)) == sorted(names)
    k8s_provider = next(r for r in run.resources if r.type == "pulumi:providers:kubernetes")
    for name in names:
        component = run.one(COMPONENT_TYPE, name)
        children = [
            run.one(SECRET_TYPE, f"{name}-secret"),
            run.one(LWS_TYPE, f"{name}-lws"),
            run.one(SERVICE_TYPE, f"{name}-leader"),
        ]
        for child in children:
            assert child.parent == component.urn
            assert child.provider.startswith(k8s_provider.urn)
            assert manifest(child)["metadata"]["namespace"] == "qwen-vl"
        secret, lws, _ = children
        assert secret.urn in lws.dependencies  # pods must not start before their key exists


def test_no_service_is_named_vllm_and_no_pod_gets_service_links(run: StackRun) -> None:
    services = [manifest(r)["metadata"]["name"] for r in run.of_type(SERVICE_TYPE)]
    assert services
    assert "vllm" not in services
    for lws in run.of_type(LWS_TYPE):
        for template in pod_templates(manifest(lws)).values():
            assert template["spec"]["enableServiceLinks"] is False


def test_secrets_are_referenced_never_inlined(run: StackRun) -> None:
    key = mock_password("engine-api-key")
    for lws in run.of_type(LWS_TYPE):
        deployment = lws.name.removesuffix("-lws")
        text = json.dumps(manifest(lws))
        assert key not in text
        assert MOCK_SECRET not in text
        secret = manifest(run.one(SECRET_TYPE, f"{deployment}-secret"))
        assert secret["stringData"] == {"VLLM_API_KEY": key}
        # pulumi keeps the Secret's payload a secret in state
        assert SECRET_SIG_KEY in run.one(SECRET_TYPE, f"{deployment}-secret").inputs["stringData"]
        for template in pod_templates(manifest(lws)).values():
            env = {v["name"]: v for v in container(template)["env"]}
            assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {
                "name": secret["metadata"]["name"],
                "key": "VLLM_API_KEY",
            }


def test_multi_node_leader_and_workers_agree(run: StackRun) -> None:
    deployment = MULTI_NODE[run.stack]
    if deployment is None:
        pytest.skip("no multi-node deployment in this stack")
    roles = pod_templates(lws_of(run, deployment))
    address = leader_address(deployment, "qwen-vl")
    size = lws_of(run, deployment)["spec"]["leaderWorkerTemplate"]["size"]
    commands = {}
    for rank in range(size):
        role = "leader" if rank == 0 else "worker"
        c = container(roles[role])
        env = resolve_env(
            c["env"],
            {"LWS_LEADER_ADDRESS": address, "LWS_GROUP_SIZE": str(size)},
            {
                "status.podIP": f"10.0.0.{rank + 2}",
                f"metadata.labels['{LWS_WORKER_INDEX_LABEL}']": str(rank),
            },
        )
        argv = [expand_k8s_vars(t, env) for t in c["command"]]
        assert argv[argv.index("--node-rank") + 1] == str(rank) == env["NODE_RANK"]
        assert argv[argv.index("--master-addr") + 1] == address == env["MASTER_ADDR"]
        assert argv[argv.index("--master-port") + 1] == env["MASTER_PORT"] == "29501"
        assert argv[argv.index("--nnodes") + 1] == str(size)
        assert ("--headless" in argv) == (rank > 0)
        commands[rank] = [t for t in argv if t != "--headless"]
    # identical engine flags: only the rank value differs
    leader = commands[0]
    for rank, argv in commands.items():
        differing = [i for i, (a, b) in enumerate(zip(leader, argv, strict=True)) if a != b]
        assert [leader[i - 1] for i in differing] == (["--node-rank"] if rank else [])


def test_multi_node_pods_get_efa_shm_and_gpus_on_both_roles(run: StackRun) -> None:
    deployment = MULTI_NODE[run.stack]
    if deployment is None:
        pytest.skip("no multi-node deployment in this stack")
    expected_efa = {"staging": "2", "prod": "32"}[run.stack]  # g6e.24xlarge, p5.48xlarge
    expected_shm = {"staging": "8Gi", "prod": "16Gi"}[run.stack]  # 2 GiB per local GPU
    roles = pod_templates(lws_of(run, deployment))
    assert set(roles) == {"leader", "worker"}
    for template in roles.values():
        limits = container(template)["resources"]["limits"]
        assert limits["vpc.amazonaws.com/efa"] == expected_efa
        assert limits["hugepages-2Mi"] == "5120Mi"
        shm = [v for v in template["spec"]["volumes"] if v["name"] == "dshm"]
        assert shm == [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": expected_shm}}
        ]
    assert "startupProbe" in container(roles["leader"])
    assert "startupProbe" not in container(roles["worker"])


def test_keda_owns_replicas_after_creation(run: StackRun) -> None:
    for lws in run.of_type(LWS_TYPE):
        assert lws.ignore_changes == ["spec.replicas"]


def test_outputs_name_each_leader_service_and_model(run: StackRun) -> None:
    settings = load_stack_file(ROOT / f"Pulumi.{run.stack}.yaml")
    expected = {
        d.name: {
            "leader_service_host": f"{d.name}-leader.qwen-vl.svc.cluster.local",
            "served_model_name": d.name,
        }
        for d in settings.serving.deployments
    }
    assert run.outputs["engines"] == expected


def _staging_with(tmp_path: Path, edit: Any) -> Path:
    document = yaml.safe_load((ROOT / "Pulumi.staging.yaml").read_text())
    edit(document["config"])
    path = tmp_path / "Pulumi.staging.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def _with_hf_token(tmp_path: Path) -> Path:
    return _staging_with(
        tmp_path, lambda c: c.update({"qwen-vl-serving:hfToken": {"secure": "v1:AAAA"}})
    )


def test_hf_token_goes_into_the_secret_and_is_referenced(tmp_path: Path) -> None:
    run = run_stack("staging", _with_hf_token(tmp_path))
    for lws in run.of_type(LWS_TYPE):
        deployment = lws.name.removesuffix("-lws")
        secret = manifest(run.one(SECRET_TYPE, f"{deployment}-secret"))
        assert secret["stringData"]["HF_TOKEN"] == MOCK_SECRET
        assert MOCK_SECRET not in json.dumps(manifest(lws))
        for template in pod_templates(manifest(lws)).values():
            env = {v["name"]: v for v in container(template)["env"]}
            assert (
                env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
            )


def _with_kv_offload(tmp_path: Path) -> Path:
    def edit(config: dict[str, Any]) -> None:
        serving = config["qwen-vl-serving:serving"]
        serving["imageIncludesLmcache"] = True
        serving["deployments"][1]["kvOffloadRedis"] = True  # the multi-node qwen3-vl-32b

    return _staging_with(tmp_path, edit)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector matching (matchLabels and `In` expressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_kv_offload_redis_points_every_rank_at_the_stacks_redis(tmp_path: Path) -> None:
    run = run_stack("staging", _with_kv_offload(tmp_path))
    secrets = {
        (manifest(r)["metadata"]["name"], key): value
        for r in run.of_type(SECRET_TYPE)
        for key, value in manifest(r)["stringData"].items()
    }
    redis = manifest(run.one(SERVICE_TYPE, "redis-service"))
    redis_policy = manifest(
        run.one("kubernetes:networking.k8s.io/v1:NetworkPolicy", "redis-ingress")
    )
    app_password = mock_password("redis-password")
    # the pods read Redis's client Secret, so the LeaderWorkerSet waits for the Redis component
    redis_urn = run.one("qwen-vl-serving:data:Redis", "redis").urn
    redis_secrets = {r.urn for r in run.of_type(SECRET_TYPE) if r.parent == redis_urn}
    assert redis_secrets  # depends_on a component waits for its children, the Secrets among them
    assert redis_secrets <= set(run.one(LWS_TYPE, "qwen3-vl-32b-lws").dependencies)
    assert not redis_secrets & set(run.one(LWS_TYPE, "qwen3-vl-2b-lws").dependencies)
    roles = pod_templates(lws_of(run, "qwen3-vl-32b"))
    assert set(roles) == {"leader", "worker"}
    for rank, template in enumerate(roles.values()):
        c = container(template)
        argv = c["command"]
        # LMCache is vLLM's LMCacheConnectorV1; kv_both stores and loads (see docs/reference/vllm.md#kv-transfer).
        assert json.loads(argv[argv.index("--kv-transfer-config") + 1]) == {
            "kv_connector": "LMCacheConnectorV1",
            "kv_role": "kv_both",
        }
        env = resolve_env(
            c["env"],
            {"LWS_LEADER_ADDRESS": leader_address("qwen3-vl-32b", "qwen-vl")},
            {"status.podIP": "10.0.0.2", f"metadata.labels['{LWS_WORKER_INDEX_LABEL}']": str(rank)},
            secrets,
        )
        url = urlsplit(env["LMCACHE_REMOTE_URL"])
        # the Secret the run really creates, the app user redis.conf defines with that password
        assert (url.username, url.password) == ("app", app_password)
        conf = secrets["redis-config", "redis.conf"]
        app_hash = "#" + hashlib.sha256(app_password.encode()).hexdigest()
        assert f"user app on {app_hash} " in conf
        # the Redis Service of this stack, on a port it serves
        assert url.hostname == f"{redis['metadata']['name']}.qwen-vl.svc.cluster.local"
        assert redis["metadata"]["namespace"] == "qwen-vl"
        assert url.port in [p["port"] for p in redis["spec"]["ports"]]
        # and Redis's NetworkPolicy admits this pod to that port
        labels = template["metadata"]["labels"]
        [clients] = [
            rule for rule in redis_policy["spec"]["ingress"]
            if url.port in [p["port"] for p in rule["ports"]]
        ]  # fmt: skip
        assert any(_selects(peer["podSelector"], labels) for peer in clients["from"])
    # the other deployment is untouched
    plain = container(pod_templates(lws_of(run, "qwen3-vl-2b"))["leader"])
    assert "--kv-transfer-config" not in plain["command"]
    assert not any(v["name"].startswith("LMCACHE_") for v in plain["env"])
    # and everything still passes kubernetes-validate strict
    for label, doc in documents(run):
        validate(label, doc)
