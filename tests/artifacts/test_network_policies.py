"""Who reaches whom, per stack: IBM's network-config-analyzer (nca, its own pinned venv) reads the
NetworkPolicies and pod templates the program registered under mocks and answers source pod x
destination x port; the tables below are written out by hand (docs/security.md says why each
row is what it is).

This module: the real evaluator on the registered objects. The other layers' tests of the same
code: tests/unit/test_network_policies.py (the renderer), tests/program/test_network_policies.py
(registration, strict validation is in tests/program/test_manifests.py), and
tests/system/test_firewall.py (the rehearsal's nftables translation, enforced by the kernel).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stacks.settings import load_stack_file
from tests.support.harness import ROOT, run_stack
from tests.support.reachability import (
    Connectivity,
    analyze,
    install_nca,
    network_policies,
    open_egress_policy,
    stack_pods,
    stand_ins,
)

NS = "qwen-vl"
GW, WEBUI, REDIS = f"{NS}/gateway-0", f"{NS}/webui-0", f"{NS}/redis-0"
OTHER, APP, OPEN = f"{NS}/other", f"{NS}/app-client", f"{NS}/app-open"
PROM, DNS, TENANT = "monitoring/prometheus", "kube-system/coredns", "elsewhere/client"
INTERNET = "52.216.0.10"  # an S3 address: outside every VPC CIDR of the stacks


def eng(lws: str, group: int, rank: int = 0) -> str:
    return f"{NS}/{lws}-{group}" if rank == 0 else f"{NS}/{lws}-{group}-{rank}"


SMALL = "qwen3-vl-2b"
Row = tuple[str, str, int, str, bool]  # source, destination, port, protocol, allowed

COMMON: list[Row] = [
    # engines' HTTP port: the gateway and Prometheus only
    (GW, eng(SMALL, 0), 8000, "TCP", True),
    (PROM, eng(SMALL, 0), 8000, "TCP", True),
    (OTHER, eng(SMALL, 0), 8000, "TCP", False),
    (TENANT, eng(SMALL, 0), 8000, "TCP", False),
    (APP, eng(SMALL, 0), 8000, "TCP", False),
    (REDIS, eng(SMALL, 0), 8000, "TCP", False),
    (GW, eng(SMALL, 0), 29501, "TCP", False),
    # a pod whose own policy opens its egress: the receivers' ingress rules alone refuse it
    (OPEN, eng(SMALL, 0), 8000, "TCP", False),
    (OPEN, REDIS, 6379, "TCP", False),
    (OPEN, REDIS, 9121, "TCP", False),
    (OPEN, GW, 8080, "TCP", True),
    (OPEN, GW, 9113, "TCP", False),
    (OPEN, INTERNET, 443, "TCP", True),
    # the gateway: from outside, from every namespace's pods; its exporter from Prometheus
    (INTERNET, GW, 8080, "TCP", True),
    (TENANT, GW, 8080, "TCP", True),
    (OTHER, GW, 8080, "TCP", False),  # default-deny egress of the serving namespace's pods
    (PROM, GW, 9113, "TCP", True),
    (TENANT, GW, 9113, "TCP", False),
    # Redis: declared clients only; exporter from Prometheus
    (APP, REDIS, 6379, "TCP", True),
    (OTHER, REDIS, 6379, "TCP", False),
    (TENANT, REDIS, 6379, "TCP", False),
    (eng(SMALL, 0), REDIS, 6379, "TCP", False),  # no kvOffloadRedis in any stack
    (PROM, REDIS, 9121, "TCP", True),
    (APP, REDIS, 9121, "TCP", False),
    # egress: the model store (HTTPS anywhere) for engines only; DNS where needed
    (eng(SMALL, 0), INTERNET, 443, "TCP", True),
    (eng(SMALL, 0), INTERNET, 80, "TCP", False),
    (GW, INTERNET, 443, "TCP", False),
    (REDIS, INTERNET, 443, "TCP", False),
    (eng(SMALL, 0), DNS, 53, "UDP", True),
    (GW, DNS, 53, "UDP", True),
    (REDIS, DNS, 53, "UDP", False),
    (OTHER, DNS, 53, "UDP", False),
]

WEBUI_ROWS: list[Row] = [
    (WEBUI, GW, 8080, "TCP", True),
    (WEBUI, REDIS, 6379, "TCP", True),
    (WEBUI, eng(SMALL, 0), 8000, "TCP", False),  # only through the gateway
    (WEBUI, INTERNET, 443, "TCP", False),
    (GW, WEBUI, 8080, "TCP", False),
    (OPEN, WEBUI, 8080, "TCP", False),
    (OTHER, WEBUI, 8080, "TCP", False),
    (TENANT, WEBUI, 8080, "TCP", False),  # pods are not its load balancer's sources
    (INTERNET, WEBUI, 8080, "TCP", False),  # outside the VPC
]


# staging's vision tier (docs/vision.md#network): the encoders' HTTP port for the gateway's
# encoder step and Prometheus only; their egress like the engines' (weights, DNS)
ENCODER = f"{NS}/{SMALL}-encoder-0"
VISION_ROWS: list[Row] = [
    (GW, ENCODER, 8000, "TCP", True),
    (PROM, ENCODER, 8000, "TCP", True),
    (OTHER, ENCODER, 8000, "TCP", False),
    (OPEN, ENCODER, 8000, "TCP", False),
    (TENANT, ENCODER, 8000, "TCP", False),
    (WEBUI, ENCODER, 8000, "TCP", False),
    (eng(SMALL, 0), ENCODER, 8000, "TCP", False),  # engines read the files, not the encoders
    (ENCODER, eng(SMALL, 0), 8000, "TCP", False),
    (ENCODER, REDIS, 6379, "TCP", False),
    (ENCODER, INTERNET, 443, "TCP", True),
    (ENCODER, INTERNET, 80, "TCP", False),
    (ENCODER, DNS, 53, "UDP", True),
]


def multi_node(lws: str) -> list[Row]:
    """A two-node group: its own ranks reach each other on every port, nobody else does."""
    return [
        (eng(lws, 0, 1), eng(lws, 0), 29501, "TCP", True),  # worker -> leader rendezvous
        (eng(lws, 0), eng(lws, 0, 1), 45123, "TCP", True),  # leader -> worker, any port (NCCL)
        (eng(lws, 0, 1), eng(lws, 0), 5555, "TCP", True),
        (eng(lws, 1, 1), eng(lws, 0), 29501, "TCP", False),  # another group's rank
        (eng(lws, 1), eng(lws, 0, 1), 45123, "TCP", False),
        (eng(lws, 1, 1), eng(lws, 1), 29501, "TCP", False),  # beyond maxReplicas: fails closed
        (eng(SMALL, 0), eng(lws, 0), 29501, "TCP", False),  # another deployment
        (GW, eng(lws, 0), 29501, "TCP", False),
        (OTHER, eng(lws, 0, 1), 29501, "TCP", False),
        (OPEN, eng(lws, 0, 1), 29501, "TCP", False),
        (OPEN, eng(lws, 0), 29501, "TCP", False),
        (PROM, eng(lws, 0, 1), 29501, "TCP", False),
        (GW, eng(lws, 0), 8000, "TCP", True),
        (GW, eng(lws, 0, 1), 8000, "TCP", False),  # workers serve no HTTP
    ]


EXPECTED: dict[str, list[Row]] = {
    "dev": [
        *COMMON,
        *WEBUI_ROWS,
        ("10.20.3.4", WEBUI, 8080, "TCP", True),  # a node of the VPC (NLB via NodePort)
        (GW, eng(SMALL, 1), 8000, "TCP", True),  # beyond max: single-node groups need no rule
        (GW, REDIS, 6379, "TCP", False),  # one replica, no quotas: no sidecar
    ],
    "staging": [
        *COMMON,
        *WEBUI_ROWS,
        *multi_node("qwen3-vl-32b"),
        ("10.30.3.4", WEBUI, 8080, "TCP", True),
        ("10.20.3.4", WEBUI, 8080, "TCP", False),  # dev's VPC
        (eng(SMALL, 0), eng(SMALL, 1), 8000, "TCP", False),  # replicas do not talk
        (GW, eng(SMALL, 2), 8000, "TCP", True),
        (GW, REDIS, 6379, "TCP", True),  # its sidecar shares session placement (2 replicas)
        *VISION_ROWS,
    ],
    "prod": [
        *COMMON,
        *multi_node("qwen3-vl-235b"),
        (GW, eng(SMALL, 7), 8000, "TCP", True),  # KEDA's 8th group
        (eng(SMALL, 7), eng(SMALL, 0), 8000, "TCP", False),
        (APP, f"{NS}/webui-0", 8080, "TCP", False),  # no web UI in prod
        (GW, REDIS, 6379, "TCP", True),  # its sidecar shares session placement (2+ replicas)
    ],
}


@pytest.fixture(scope="module")
def nca() -> Path:
    return install_nca()


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def connectivity(
    request: pytest.FixtureRequest, nca: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Connectivity]:
    stack = request.param
    settings = load_stack_file(ROOT / f"Pulumi.{stack}.yaml")
    run = run_stack(stack)
    pods = [*stack_pods(run, settings), *stand_ins(settings)]
    policies = [*network_policies(run), open_egress_policy(settings)]
    return stack, analyze(nca, pods, policies, tmp_path_factory.mktemp(stack))


def test_reachability_table(connectivity: tuple[str, Connectivity]) -> None:
    stack, found = connectivity
    wrong = [
        f"{src} -> {dst}:{port}/{proto}: expected {'allowed' if allowed else 'denied'}"
        for src, dst, port, proto, allowed in EXPECTED[stack]
        if found.allowed(src, dst, port, proto) != allowed
    ]
    assert wrong == []


def test_nothing_reaches_an_engine_that_the_table_does_not_name(
    connectivity: tuple[str, Connectivity],
) -> None:
    """The whole map, not only the rows: every grant into an engine pod comes from the gateway,
    Prometheus or a rank of the same group (nca prints one line per source/destination pair)."""
    stack, found = connectivity
    for grant in found.grants:
        if "/" not in grant.dst or not grant.dst.split("/")[1].startswith("qwen3-vl-"):
            continue
        src = grant.src
        if src in (GW, PROM):
            continue
        # same group: same "<lws>-<group>" prefix
        dst_group = "-".join(grant.dst.split("/")[1].split("-")[:4])
        assert src.split("/")[1].startswith(dst_group), f"{stack}: {grant}"
