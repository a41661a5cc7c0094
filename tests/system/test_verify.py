"""scripts/verify.py without a cluster: its refusals, and the host lists it builds.

The kubectl and ssh targets are driven by a fake `kubectl` on PATH that answers from a
small cluster description (pods with labels, Secrets, nodes) the way the real one does:
label selectors filter, `-o json` lists, `port-forward` prints its local port and waits.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import textwrap
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from scripts import verify
from scripts.rehearsal import inventory as inv
from stacks.settings import load_stack_file, stack_file

ROOT = Path(__file__).resolve().parents[2]
VERIFY = [sys.executable, "-m", "scripts.verify"]

FAKE_KUBECTL = textwrap.dedent(
    """\
    #!/usr/bin/env python3
    import json, os, sys, time
    args = [a for a in sys.argv[1:] if not a.startswith(("--kubeconfig=", "--context="))]
    cluster = json.load(open(os.environ["FAKE_CLUSTER"]))
    if args[0] == "port-forward":
        pod, port = args[3].removeprefix("pod/"), args[4].lstrip(":")
        print(f"Forwarding from 127.0.0.1:{40000 + int(port) % 1000} -> {port}", flush=True)
        time.sleep(60)
        sys.exit(0)
    kind, rest = args[1], args[2:]
    ns = rest[rest.index("-n") + 1] if "-n" in rest else None
    if kind == "nodes":
        items = cluster["nodes"]
    elif kind == "pods":
        wanted = dict(kv.split("=") for kv in rest[rest.index("-l") + 1].split(","))
        items = [
            p for p in cluster["pods"]
            if p["metadata"]["namespace"] == ns
            and wanted.items() <= p["metadata"]["labels"].items()
        ]
    else:
        name = rest[rest.index("-n") + 2]
        secret = cluster["secrets"].get(f"{ns}/{name}")
        if secret is None:
            print(f'Error from server (NotFound): secrets "{name}" not found', file=sys.stderr)
            sys.exit(1)
        print(json.dumps({"data": secret}))
        sys.exit(0)
    print(json.dumps({"items": items}))
    """
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def pod(name: str, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "status": {"phase": "Running"},
    }


def node(name: str, address: str, instance: str, group: str | None) -> dict[str, Any]:
    labels = {"node.kubernetes.io/instance-type": instance}
    if group:
        labels["qwen-vl-serving/node-group"] = group
    return {
        "metadata": {"name": name, "labels": labels},
        "status": {"addresses": [{"type": "InternalIP", "address": address}]},
    }


def staging_cluster() -> dict[str, Any]:
    lws = "leaderworkerset.sigs.k8s.io/"
    engines = [
        pod(name, "qwen-vl", {f"{lws}name": d, f"{lws}group-index": "0", f"{lws}worker-index": r})
        for name, d, r in [
            ("qwen3-vl-2b-0", "qwen3-vl-2b", "0"),
            ("qwen3-vl-32b-0", "qwen3-vl-32b", "0"),
            ("qwen3-vl-32b-0-1", "qwen3-vl-32b", "1"),
        ]
    ]
    gateway = {"app.kubernetes.io/name": "gateway", "app.kubernetes.io/component": "gateway"}
    return {
        "pods": [
            pod("gateway-7d9f-abcde", "qwen-vl", gateway),
            pod("redis-0", "qwen-vl", {"app.kubernetes.io/name": "redis"}),
            pod(
                "prometheus-monitoring-prometheus-0",
                "monitoring",
                {"app.kubernetes.io/name": "prometheus"},
            ),
            pod("webui-1", "qwen-vl", {"app.kubernetes.io/name": "webui"}),
            *engines,
        ],
        "secrets": {
            "qwen-vl/gateway-api-keys": {
                "api-keys.map": b64(
                    'map $http_authorization $api_key_id {\n    default "";\n'
                    '    "Bearer KeyOfDefault0123456789" "default";\n'
                    '    "Bearer KeyOfWebui012345678901" "webui";\n}\n'
                )
            },
            "qwen-vl/vllm-engine-qwen3-vl-2b": {"VLLM_API_KEY": b64("EngineKey0123456789")},
            "qwen-vl/redis-config": {"exporter-password": b64("ExporterPassword0123")},
        },
        "nodes": [
            node("ip-10-30-1-5.ec2.internal", "10.30.1.5", "m7i.xlarge", None),
            node("ip-10-30-2-7.ec2.internal", "10.30.2.7", "g6e.24xlarge", "l40s-efa"),
        ],
    }


@pytest.fixture
def fake_kubectl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.replace("python3", sys.executable, 1))
    kubectl.chmod(0o755)
    cluster = tmp_path / "cluster.json"
    cluster.write_text(json.dumps(staging_cluster()))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_CLUSTER", str(cluster))
    return cluster


# --------------------------------------------------------------------------- refusals


def run_verify(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VERIFY, *args], capture_output=True, text=True, timeout=120, check=False, env=env
    )


def test_no_running_rehearsal_is_a_usage_error(tmp_path: Path) -> None:
    result = run_verify("--stack", "dev", "--state-dir", str(tmp_path), "--no-record")
    assert result.returncode == 2
    assert f"no rehearsal is running in {tmp_path}" in result.stderr
    assert "make rehearse STACK=dev" in result.stderr


def write_inventory(directory: Path, stack: str, config_hash: str) -> None:
    data = {"version": inv.VERSION, "target": "rehearsal", "stack": stack, "hosts": []}
    (directory / "inventory.json").write_text(json.dumps(data | {"config_hash": config_hash}))


def test_a_rehearsal_of_another_stack_is_refused(tmp_path: Path) -> None:
    write_inventory(tmp_path, "staging", "x")
    result = run_verify("--stack", "dev", "--state-dir", str(tmp_path), "--no-record")
    assert result.returncode == 2
    assert "runs stack staging, not dev" in result.stderr


def test_a_rehearsal_of_an_older_stack_file_is_refused(tmp_path: Path) -> None:
    write_inventory(tmp_path, "dev", "0" * 64)
    result = run_verify("--stack", "dev", "--state-dir", str(tmp_path), "--no-record")
    assert result.returncode == 2
    assert "Pulumi.dev.yaml changed since the rehearsal started: restart it" in result.stderr


def test_an_unreadable_inventory_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "inventory.json").mkdir()  # unreadable even for root
    result = run_verify("--stack", "dev", "--state-dir", str(tmp_path), "--no-record")
    assert result.returncode == 2
    assert result.stderr == f"verify: {tmp_path}/inventory.json: cannot read it: Is a directory\n"


def test_an_unknown_stack_is_a_usage_error() -> None:
    result = run_verify("--stack", "nosuch", "--no-record")
    assert result.returncode == 2
    assert result.stderr == (
        f"verify: {ROOT}/Pulumi.nosuch.yaml: 1 configuration problem(s):\n"
        "  - file: no such stack file\n"
    )


def test_kubectl_target_needs_kubectl(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=str(tmp_path))  # nothing on PATH
    result = run_verify("--stack", "dev", "--target", "kubectl", "--no-record", env=env)
    assert result.returncode == 2
    assert "--target kubectl needs kubectl on PATH" in result.stderr


# --------------------------------------------------------------------------- host lists


@pytest.mark.usefixtures("fake_kubectl")
def test_kubectl_inventory_lists_the_stacks_pods_by_role(tmp_path: Path) -> None:
    settings = load_stack_file(stack_file("staging"))
    kubectl = verify.Kubectl(None, None)
    with ExitStack() as stack:
        data = verify.kubectl_inventory(settings, kubectl, tmp_path, stack)
        inventory = inv.parse(data)
        roles = {h.name: sorted(h.roles) for h in inventory.hosts}
        assert roles == {
            "gateway-7d9f-abcde": ["gateway"],
            "qwen3-vl-2b-0": ["engine-leader", "engine-pod"],
            "qwen3-vl-32b-0": ["engine-leader", "engine-pod"],
            "qwen3-vl-32b-0-1": ["engine-pod", "engine-worker"],
            "redis-0": ["redis"],
            "prometheus-monitoring-prometheus-0": ["prometheus"],
        }
        worker = inventory.host("qwen3-vl-32b-0-1")
        assert worker.spec == "kubectl://qwen3-vl-32b-0-1?namespace=qwen-vl&container=vllm"
        assert worker.roles["engine-worker"]["master_addr"] == "qwen3-vl-32b-0.qwen3-vl-32b.qwen-vl"
        # g6e.24xlarge: 4 GPUs, 2 EFA; 2 nodes x 4 GPUs need more than Docker's 64 MiB
        assert worker.roles["engine-pod"]["gpus"] == 4
        assert worker.roles["engine-pod"]["efa_devices"] == 2
        assert worker.roles["engine-pod"]["min_shm_bytes"] > 64 * 2**20
        # HTTP checks go through port-forwards (the fake's local port is 40000 + port % 1000)
        assert (
            inventory.host("gateway-7d9f-abcde").roles["gateway"]["url"] == "http://127.0.0.1:40080"
        )
        assert (
            inventory.host("qwen3-vl-2b-0").roles["engine-leader"]["url"]
            == "http://127.0.0.1:40000"
        )
        prometheus = inventory.host("prometheus-monitoring-prometheus-0").roles["prometheus"]
        assert prometheus["url"] == "http://127.0.0.1:40090"
        secrets = inventory.secrets()
        assert oct(Path(data["secrets_file"]).stat().st_mode & 0o777) == "0o600"
    assert secrets == {
        "gateway_key_id": "default",
        "gateway_api_key": "KeyOfDefault0123456789",
        "engine_api_key": "EngineKey0123456789",
        "redis_exporter_password": "ExporterPassword0123",
    }


def test_a_missing_secret_names_it(fake_kubectl: Path, tmp_path: Path) -> None:
    cluster = json.loads(fake_kubectl.read_text())
    del cluster["secrets"]["qwen-vl/redis-config"]
    fake_kubectl.write_text(json.dumps(cluster))
    settings = load_stack_file(stack_file("staging"))
    with ExitStack() as stack, pytest.raises(verify.VerifyError, match="redis-config"):
        verify.kubectl_inventory(settings, verify.Kubectl(None, None), tmp_path, stack)


@pytest.mark.usefixtures("fake_kubectl")
def test_ssh_inventory_has_every_node_with_its_expectations() -> None:
    settings = load_stack_file(stack_file("staging"))
    args = argparse.Namespace(
        ssh_user="ec2-user", ssh_config="/cfg", ssh_identity_file=None, sudo=True
    )
    inventory = inv.parse(verify.ssh_inventory(settings, verify.Kubectl(None, None), args))
    system, gpu = inventory.hosts
    assert system.spec == "ssh://ec2-user@10.30.1.5?ssh_config=%2Fcfg&sudo=true"
    assert sorted(system.roles) == ["node"]
    assert sorted(gpu.roles) == ["gpu-node", "node"]
    assert gpu.roles["gpu-node"] == {"gpus": 4, "efa_devices": 2, "hugepages_mib": 10256}
    node = system.roles["node"]
    assert node["chrony_conf_path"] == "/etc/chrony.conf"
    # m7i in us-east-1 has the ENA PTP clock: the cluster's conf carries the PHC line
    assert "refclock PHC /dev/ptp_ena" in node["chrony_conf"]
    assert "server 169.254.169.123 prefer iburst" in node["chrony_conf"]
    assert node["chronyc"] == []
    assert "refclock PHC" not in gpu.roles["node"]["chrony_conf"]
