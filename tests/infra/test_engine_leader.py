"""Engine leaders (rank 0): the vLLM HTTP surface on its port, the group's rendezvous port."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.infra import probes
from tests.infra.probes import InfraHost


@pytest.fixture(scope="module")
def http() -> httpx.Client:
    return probes.client()


@pytest.fixture(scope="module")
def engine_key(secrets: dict[str, Any]) -> str:
    return str(secrets["engine_api_key"])


def test_listens_on_the_engine_port(host: InfraHost, role_vars: dict[str, Any]) -> None:
    assert probes.listening(host, role_vars["port"])


def test_runs_vllm_serve_as_rank_0(host: InfraHost, role_vars: dict[str, Any]) -> None:
    argv = probes.engine_command(host, role_vars["model"])
    assert argv, f"no `vllm serve {role_vars['model']}` process on this host"
    assert probes.flag(argv, "--port") == str(role_vars["port"])
    assert probes.flag(argv, "--served-model-name") == role_vars["served_model_name"]
    assert "--headless" not in argv
    if role_vars["nnodes"] > 1:
        assert probes.flag(argv, "--node-rank") == "0"
        assert probes.flag(argv, "--nnodes") == str(role_vars["nnodes"])


def test_health(http: httpx.Client, role_vars: dict[str, Any]) -> None:
    assert http.get(role_vars["url"] + "/health").status_code == 200


def test_models_lists_the_served_name(
    http: httpx.Client, role_vars: dict[str, Any], engine_key: str
) -> None:
    response = http.get(role_vars["url"] + "/v1/models", headers=probes.bearer(engine_key))
    assert response.status_code == 200, response.text
    assert [m["id"] for m in probes.json_of(response)["data"]] == [role_vars["served_model_name"]]


def test_the_api_needs_the_engine_key(http: httpx.Client, role_vars: dict[str, Any]) -> None:
    assert http.get(role_vars["url"] + "/v1/models").status_code == 401


def test_metrics_expose_the_queue(http: httpx.Client, role_vars: dict[str, Any]) -> None:
    response = http.get(role_vars["url"] + "/metrics")
    assert response.status_code == 200
    name = re.escape(role_vars["served_model_name"])
    sample = re.compile(
        rf'^vllm:num_requests_waiting\{{[^}}]*model_name="{name}"[^}}]*\}} \d', re.M
    )
    assert sample.search(response.text), response.text[:1000]


def test_every_worker_joined(host: InfraHost, role_vars: dict[str, Any]) -> None:
    if role_vars["nnodes"] == 1:
        pytest.skip("a single-node engine has no workers")
    port = role_vars["master_port"]
    assert probes.listening_anywhere(host, port)
    # One peer host per worker. vLLM's rank 0 also connects to its own store on this port
    # (from its own address), which says nothing about the workers.
    joined = [
        s
        for s in probes.established(host)
        if s.local_port == port and s.remote != s.local and not s.remote.is_loopback
    ]
    assert len({s.remote for s in joined}) == role_vars["nnodes"] - 1, joined
