"""Open WebUI as the real program builds it, under Pulumi mocks; its settings rules.

This module: the Pulumi program under mocks. The other layers' tests of the same code:
tests/unit/test_webui.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.support.harness import StackRun, mock_password, run_stack
from tests.support.redis import NS, POLICY, STS, doc, peers, run_variant, stack_config

DEPLOYMENT = "kubernetes:apps/v1:Deployment"


SECRET = "kubernetes:core/v1:Secret"


SERVICE = "kubernetes:core/v1:Service"


PVC = "kubernetes:core/v1:PersistentVolumeClaim"


STORAGE = "kubernetes:storage.k8s.io/v1:StorageClass"


SECRET_ENV = {  # environment variable -> entry of the "webui" Secret
    "OPENAI_API_KEY": "OPENAI_API_KEY",
    "WEBUI_SECRET_KEY": "WEBUI_SECRET_KEY",
    "WEBUI_ADMIN_PASSWORD": "WEBUI_ADMIN_PASSWORD",
    "REDIS_URL": "REDIS_URL",
    "WEBSOCKET_REDIS_URL": "REDIS_URL",
}


@pytest.fixture(scope="module")
def dev() -> StackRun:
    return run_stack("dev")


def container(run: StackRun) -> dict[str, Any]:
    (only,) = doc(run, DEPLOYMENT, "webui-deployment")["spec"]["template"]["spec"]["containers"]
    return only


def env_of(run: StackRun) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(run)["env"]}


def test_it_talks_to_the_gateway_and_keeps_state_in_redis(dev: StackRun) -> None:
    env = env_of(dev)
    plain = {name: e["value"] for name, e in env.items() if "value" in e}
    assert plain["OPENAI_API_BASE_URL"] == "http://gateway.qwen-vl.svc.cluster.local/v1"
    assert plain["WEBSOCKET_MANAGER"] == "redis"
    assert plain["ENABLE_WEBSOCKET_SUPPORT"] == "True"
    assert plain["ENABLE_SIGNUP"] == "False"
    assert plain["ENABLE_PERSISTENT_CONFIG"] == "False"
    assert plain["ENABLE_OLLAMA_API"] == "False"
    assert plain["WEBUI_ADMIN_EMAIL"] == "admin@example.com"
    assert plain["DATA_DIR"] == "/app/backend/data"
    assert container(dev)["image"] == stack_config("dev")[NS + "webui"]["image"]


def test_every_credential_is_a_secret_reference(dev: StackRun) -> None:
    env = env_of(dev)
    secret = doc(dev, SECRET, "webui-secret")
    assert secret["metadata"]["name"] == "webui"
    for name, entry in SECRET_ENV.items():
        assert env[name] == {
            "name": name,
            "valueFrom": {"secretKeyRef": {"name": "webui", "key": entry}},
        }
        assert entry in secret["stringData"]
    values = secret["stringData"]
    assert values["OPENAI_API_KEY"] == mock_password("gateway-key-webui")  # its own gateway key
    assert values["WEBUI_SECRET_KEY"] == mock_password("webui-secret-key")
    assert values["WEBUI_ADMIN_PASSWORD"] == mock_password("webui-admin-password")
    url = urlsplit(values["REDIS_URL"])
    assert (url.scheme, url.username, url.password) == (
        "redis",
        "app",
        mock_password("redis-password"),
    )
    assert (url.hostname, url.port) == ("redis.qwen-vl.svc.cluster.local", 6379)
    deployment = json.dumps(doc(dev, DEPLOYMENT, "webui-deployment"))
    for name in ("gateway-key-webui", "webui-secret-key", "webui-admin-password", "redis-password"):
        assert mock_password(name) not in deployment


def test_users_and_chats_live_on_a_persistent_volume(dev: StackRun) -> None:
    claim = doc(dev, PVC, "webui-data")
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert (
        claim["spec"]["storageClassName"] == doc(dev, STORAGE, "webui-storage")["metadata"]["name"]
    )
    spec = doc(dev, DEPLOYMENT, "webui-deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}  # a RWO volume cannot be in two pods
    (volume,) = spec["template"]["spec"]["volumes"]
    assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"]}
    (mount,) = container(dev)["volumeMounts"]
    assert (mount["name"], mount["mountPath"]) == (volume["name"], "/app/backend/data")


def test_it_is_served_by_its_own_internal_nlb(dev: StackRun) -> None:
    pod_labels = doc(dev, DEPLOYMENT, "webui-deployment")["spec"]["template"]["metadata"]["labels"]
    service = doc(dev, SERVICE, "webui-service")
    assert service["metadata"]["name"] == "webui"
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http"}]
    nlb = doc(dev, SERVICE, "webui-nlb")
    assert nlb["spec"]["type"] == "LoadBalancer"
    annotations = nlb["metadata"]["annotations"]
    assert annotations["service.beta.kubernetes.io/aws-load-balancer-type"] == "nlb"
    assert annotations["service.beta.kubernetes.io/aws-load-balancer-internal"] == "true"
    assert (
        "qwen-vl-serving/stack=dev"
        in annotations["service.beta.kubernetes.io/aws-load-balancer-additional-resource-tags"]
    )
    for svc in (service, nlb):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert container(dev)["ports"] == [{"name": "http", "containerPort": 8080}]
    assert dev.outputs["webui_internal_url"] == "http://webui.qwen-vl.svc.cluster.local:8080"
    assert dev.outputs["webui_admin_password"] == mock_password("webui-admin-password")


def test_redis_admits_the_web_ui_pods(dev: StackRun) -> None:
    pod_labels = doc(dev, DEPLOYMENT, "webui-deployment")["spec"]["template"]["metadata"]["labels"]
    selectors = [p["podSelector"]["matchLabels"] for p in peers(dev)[0]]
    assert any(s.items() <= pod_labels.items() for s in selectors)
    redis_labels = doc(dev, STS, "redis-statefulset")["spec"]["template"]["metadata"]["labels"]
    assert not any(s.items() <= redis_labels.items() for s in selectors)
    assert doc(dev, POLICY, "redis-ingress")


def test_internal_exposure_has_no_load_balancer(tmp_path: Path) -> None:
    run = run_variant(tmp_path, "dev", webui={"exposure": "internal"})
    assert run.one(SERVICE, "webui-service")
    assert not [r for r in run.resources if r.name == "webui-nlb"]
    assert run.outputs["webui_url"] is None


def test_prod_runs_no_web_ui_unless_enabled_and_then_keeps_its_volume(tmp_path: Path) -> None:
    prod = run_stack("prod")
    assert not [
        r
        for r in prod.resources
        if r.name.startswith("webui") and r.type.startswith(("kubernetes:", "qwen-vl-serving:"))
    ]
    assert not [k for k in prod.outputs if k.startswith("webui")]
    image = "ghcr.io/open-webui/open-webui:v0.7.2@sha256:" + "1" * 64
    run = run_variant(tmp_path, "prod", webui={"enabled": True, "image": image})
    for typ, name in ((PVC, "webui-data"), (STORAGE, "webui-storage")):
        resource = run.one(typ, name)
        assert (resource.protect, resource.retain_on_delete) == (True, True), name
    assert doc(run, STORAGE, "webui-storage")["reclaimPolicy"] == "Retain"
    # the Deployment holds no data: replacing or deleting it loses nothing
    assert not run.one(DEPLOYMENT, "webui-deployment").protect
