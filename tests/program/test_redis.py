"""Redis as the real program builds it for each stack, under Pulumi mocks; its settings rules.

This module: the Pulumi program under mocks. The other layers' tests of the same code:
tests/unit/test_redis.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import StackRun, mock_password, run_stack
from tests.support.redis import NS, POLICY, STS, doc, peers, run_variant, stack_config

SECRET = "kubernetes:core/v1:Secret"


SERVICE = "kubernetes:core/v1:Service"


STORAGE = "kubernetes:storage.k8s.io/v1:StorageClass"


# maxmemoryMib and volumeGib of each stack file (staging keeps the schema defaults 1024 / 10)
MAXMEMORY_BYTES = {"dev": 512 * 2**20, "staging": 1024 * 2**20, "prod": 4096 * 2**20}


VOLUME = {"dev": "5Gi", "staging": "10Gi", "prod": "20Gi"}


POD_MEMORY = {"dev": "1024Mi", "staging": "1792Mi", "prod": "6400Mi"}  # 1.5 x max + 256


@pytest.fixture(scope="module")
def runs() -> dict[str, StackRun]:
    return {stack: run_stack(stack) for stack in ("dev", "staging", "prod")}


def pod(run: StackRun) -> dict[str, Any]:
    return doc(run, STS, "redis-statefulset")["spec"]["template"]["spec"]


def containers(run: StackRun) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod(run)["containers"]}


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_the_config_secret_carries_the_stack_settings(
    runs: dict[str, StackRun], stack: str
) -> None:
    data = doc(runs[stack], SECRET, "redis-config")["stringData"]
    conf = data["redis.conf"]
    assert f"\nmaxmemory {MAXMEMORY_BYTES[stack]}\n" in conf
    assert "\nmaxmemory-policy allkeys-lfu\n" in conf
    assert "\nappendfsync everysec\n" in conf
    app_hash = hashlib.sha256(mock_password("redis-password").encode()).hexdigest()
    assert f"\nuser app on #{app_hash} " in conf
    assert mock_password("redis-password") not in conf
    assert data["exporter-password"] == mock_password("redis-exporter-password")
    # the pod template changes with the file, so a new config restarts Redis
    annotations = doc(runs[stack], STS, "redis-statefulset")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations["checksum/config"] == hashlib.sha256(conf.encode()).hexdigest()


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_the_volume_is_gp3_and_sized_from_settings(runs: dict[str, StackRun], stack: str) -> None:
    sts = doc(runs[stack], STS, "redis-statefulset")["spec"]
    (claim,) = sts["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == VOLUME[stack]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    storage = doc(runs[stack], STORAGE, "redis-storage")
    assert claim["spec"]["storageClassName"] == storage["metadata"]["name"] == "qwen-vl-redis-gp3"
    assert storage["provisioner"] == "ebs.csi.aws.com"
    assert storage["parameters"] == {"type": "gp3", "encrypted": "true"}
    assert storage["volumeBindingMode"] == "WaitForFirstConsumer"
    mounts = {m["name"]: m["mountPath"] for m in containers(runs[stack])["redis"]["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/data"


def test_prod_keeps_redis_and_its_volume_on_destroy(runs: dict[str, StackRun]) -> None:
    prod = runs["prod"]
    for typ, name in ((STS, "redis-statefulset"), (STORAGE, "redis-storage")):
        resource = prod.one(typ, name)
        assert (resource.protect, resource.retain_on_delete) == (True, True), name
    assert doc(prod, STORAGE, "redis-storage")["reclaimPolicy"] == "Retain"
    retention = doc(prod, STS, "redis-statefulset")["spec"]["persistentVolumeClaimRetentionPolicy"]
    assert retention == {"whenDeleted": "Retain", "whenScaled": "Retain"}


@pytest.mark.parametrize("stack", ["dev", "staging"])
def test_other_stacks_clean_their_volume_up(runs: dict[str, StackRun], stack: str) -> None:
    run = runs[stack]
    for typ, name in ((STS, "redis-statefulset"), (STORAGE, "redis-storage")):
        resource = run.one(typ, name)
        assert (resource.protect, resource.retain_on_delete) == (False, False), name
    assert doc(run, STORAGE, "redis-storage")["reclaimPolicy"] == "Delete"
    retention = doc(run, STS, "redis-statefulset")["spec"]["persistentVolumeClaimRetentionPolicy"]
    assert retention["whenDeleted"] == "Delete"


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_the_pod_runs_redis_and_its_exporter_on_system_nodes(
    runs: dict[str, StackRun], stack: str
) -> None:
    spec = pod(runs[stack])
    assert spec["nodeSelector"] == {"qwen-vl-serving/role": "system"}
    assert spec["enableServiceLinks"] is False
    redis, exporter = containers(runs[stack])["redis"], containers(runs[stack])["exporter"]
    images = stack_config(stack)[NS + "redis"]
    assert (redis["image"], exporter["image"]) == (images["image"], images["exporterImage"])
    assert redis["args"] == ["redis-server", "/usr/local/etc/redis/redis.conf"]
    assert redis["resources"]["limits"]["memory"] == POD_MEMORY[stack]
    env = {e["name"]: e for e in exporter["env"]}
    assert env["REDIS_USER"]["value"] == "exporter"
    assert env["REDIS_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "redis-config", "key": "exporter-password"}
    }
    assert env["REDIS_ADDR"]["value"] == "redis://127.0.0.1:6379"
    assert exporter["ports"] == [{"name": "metrics", "containerPort": 9121}]
    # the probe's password comes from the Secret; the probe command carries none
    assert "exporter-password" in str(redis["env"])
    assert mock_password("redis-exporter-password") not in str(spec)


def test_services_for_the_statefulset_and_its_clients(runs: dict[str, StackRun]) -> None:
    dev = runs["dev"]
    headless = doc(dev, SERVICE, "redis-headless")
    service = doc(dev, SERVICE, "redis-service")
    sts = doc(dev, STS, "redis-statefulset")
    assert headless["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    assert service["metadata"]["name"] == "redis"
    assert service["spec"]["type"] == "ClusterIP"
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "redis": 6379,
        "metrics": 9121,
    }
    labels = sts["spec"]["template"]["metadata"]["labels"]
    for svc in (headless, service):
        assert svc["spec"]["selector"].items() <= labels.items()


def test_the_network_policy_admits_the_web_ui_where_it_runs(runs: dict[str, StackRun]) -> None:
    client_label = {"podSelector": {"matchLabels": {"qwen-vl-serving/redis-client": "true"}}}
    webui = {
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/name": "webui",
                "app.kubernetes.io/component": "chat-ui",
            }
        }
    }
    assert peers(runs["dev"])[0] == [client_label, webui]
    assert peers(runs["prod"])[0] == [client_label]  # prod runs no web UI
    prometheus = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }
    assert peers(runs["prod"])[1] == [prometheus]
    policy = doc(runs["dev"], POLICY, "redis-ingress")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    labels = doc(runs["dev"], STS, "redis-statefulset")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()


def test_engines_with_kv_offload_are_admitted(tmp_path: Path) -> None:
    config = stack_config("dev")[NS + "serving"]
    deployments = [{**config["deployments"][0], "kvOffloadRedis": True}]
    run = run_variant(
        tmp_path, "dev", serving={"imageIncludesLmcache": True, "deployments": deployments}
    )
    engines = {
        "podSelector": {
            "matchLabels": {"app.kubernetes.io/component": "engine"},
            "matchExpressions": [
                {"key": "qwen-vl-serving/deployment", "operator": "In", "values": ["qwen3-vl-2b"]}
            ],
        }
    }
    assert engines in peers(run)[0]


def test_clients_get_the_app_user_from_the_auth_secret(runs: dict[str, StackRun]) -> None:
    data = doc(runs["dev"], SECRET, "redis-auth")
    assert data["metadata"]["name"] == "redis-auth"
    assert data["stringData"] == {"username": "app", "password": mock_password("redis-password")}


def test_connection_details_and_key_scheme_are_stack_outputs(runs: dict[str, StackRun]) -> None:
    out = runs["dev"].outputs
    assert (out["redis_host"], out["redis_port"], out["redis_username"]) == (
        "redis.qwen-vl.svc.cluster.local",
        6379,
        "app",
    )
    assert out["redis_password"] == mock_password("redis-password")
    assert out["redis_client_secret"] == "redis-auth"
    assert out["redis_key_scheme"]["vision"]["ttlSeconds"] == 86400
    assert out["redis_key_scheme"]["session"]["ttlSeconds"] == 3600


def test_a_stack_without_redis_has_none(tmp_path: Path) -> None:
    # Without Redis the replicas cannot share session placements: switched off too.
    run = run_variant(
        tmp_path, "prod", redis={"enabled": False}, gateway={"sharedSessionPlacement": False}
    )
    # (the generated password exists regardless: program/secrets.py makes every credential)
    assert not [
        r
        for r in run.resources
        if r.name.startswith("redis") and r.type.startswith(("kubernetes:", "qwen-vl-serving:"))
    ]
    assert not [k for k in run.outputs if k.startswith("redis")]
