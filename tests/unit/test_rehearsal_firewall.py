"""The rehearsal's firewall in its plan: which hosts get an nftables script, for which pods, and
what a multi-node group's hosts and the gateway may send and receive.

This module: the plan (pure). The other layers' tests of the same code:
tests/unit/test_firewall.py (the translation), tests/system/test_firewall.py (the kernel on
namespaces of its own), tests/system/test_rehearse_real.py (a rehearsal on real engines,
probed from its client namespace), tests/program/test_network_policies.py (the labels the plan
gives each pod are the registered templates').

Staging's hosts, in the order plan_network numbers them (10.231.0.1 onwards): timeserver,
gateway-0, gateway-1, services, qwen3-vl-2b-0, qwen3-vl-32b-0 (leader), qwen3-vl-32b-0-1 (its
worker), client.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

import pytest

from scripts.rehearsal import plan as P
from tests.support.rehearsal_plan import LAYOUT, plan_of, settings_of

TIME, GW0, GW1, SERVICES, SMALL, LEADER, WORKER, CLIENT = (f"10.231.0.{i}" for i in range(1, 9))


def chains(plan: P.RehearsalPlan, role: str) -> dict[str, list[str]]:
    """The accept rules of a host's script, by chain, without the common head."""
    path = dict(plan.firewall)[role]
    text = next(f.text for f in plan.files if f.path == path)
    found = {}
    for chain in ("ingress", "egress"):
        body = text.split(f"chain {chain} {{", 1)[1].split("\n  }", 1)[0].strip().splitlines()
        found[chain] = [line.strip() for line in body[3:]]  # type, loopback, replies
    return found


def test_every_pod_host_gets_a_script_and_the_others_none() -> None:
    plan, _, _ = plan_of("staging")
    # staging's pod hosts are its simulated nodes; the time server and the client are neither
    assert [role for role, _ in plan.firewall] == [h.role for h in plan.hosts if h.node]
    assert {h.role for h in plan.hosts if not h.node} == {"timeserver", "client"}
    assert dict(plan.firewall)["services"] == LAYOUT.host("services") / "firewall.nft"
    assert plan.inventory["firewall"] is True


def test_no_firewall_gives_no_script() -> None:
    settings = settings_of("staging")
    options = P.Options(run="staging", layout=LAYOUT, firewall=False)
    plan = P.plan_rehearsal(settings, P.generate_secrets(settings), options)
    assert plan.firewall == ()
    assert not [f for f in plan.files if f.path.name == "firewall.nft"]
    assert plan.inventory["firewall"] is False


def test_the_groups_leader_admits_gateways_and_prometheus_on_http_and_its_group_on_all() -> None:
    plan, _, _ = plan_of("staging")
    leader = chains(plan, "qwen3-vl-32b-0")
    assert leader["ingress"] == [
        f'ip saddr {SERVICES} tcp dport 9100 accept comment "node"',
        f"ip saddr {{ {GW0}, {GW1}, {SERVICES} }} tcp dport 8000 "
        'accept comment "engine-qwen3-vl-32b-http"',
        f'ip saddr {{ {LEADER}, {WORKER} }} accept comment "engine-qwen3-vl-32b-group-0"',
    ]
    assert leader["egress"] == [
        f'ip daddr {TIME} udp dport 123 accept comment "node"',
        'ip daddr 0.0.0.0/0 tcp dport 443 accept comment "engine-qwen3-vl-32b-egress"',
        f'ip daddr {{ {LEADER}, {WORKER} }} accept comment "engine-qwen3-vl-32b-group-0"',
    ]


def test_the_worker_serves_its_group_only() -> None:
    plan, _, _ = plan_of("staging")
    assert chains(plan, "qwen3-vl-32b-0-1")["ingress"] == [
        f'ip saddr {SERVICES} tcp dport 9100 accept comment "node"',
        f'ip saddr {{ {LEADER}, {WORKER} }} accept comment "engine-qwen3-vl-32b-group-0"',
    ]


def test_the_gateway_sends_to_the_leaders_http_port_only() -> None:
    plan, _, _ = plan_of("staging")
    assert chains(plan, "gateway-1")["egress"] == [
        f'ip daddr {TIME} udp dport 123 accept comment "node"',
        f'ip daddr {{ {SMALL}, {LEADER} }} tcp dport 8000 accept comment "gateway"',
        # its sidecar shares session placements through Redis (two replicas in staging)
        f'ip daddr {SERVICES} tcp dport 6379 accept comment "redis-clients"',
    ]


def test_the_services_host_opens_each_pods_own_ports() -> None:
    plan, _, _ = plan_of("staging")
    services = chains(plan, "services")
    # the gateways are Redis clients (shared session placement); no web UI, no LMCache engine
    assert services["ingress"] == [
        f'ip saddr {SERVICES} tcp dport 9100 accept comment "node"',
        f'ip saddr {{ {GW0}, {GW1} }} tcp dport 6379 accept comment "redis"',
        f'ip saddr {SERVICES} tcp dport 9121 accept comment "redis"',
        'tcp dport 9090 accept comment "prometheus: not isolated"',
    ]
    # Prometheus (namespace monitoring) has no policy: the host sends what it may
    assert services["egress"][-1] == 'accept comment "prometheus: not isolated"'


def test_engine_pods_carry_the_lws_controllers_labels() -> None:
    settings = settings_of("staging")
    d = next(d for d in settings.serving.deployments if d.name == "qwen3-vl-32b")
    assert P.engine_pod_labels(settings, P.EnginePod(d, group=0, rank=1)) == {
        "app.kubernetes.io/name": "qwen3-vl-32b",
        "app.kubernetes.io/component": "engine",
        "app.kubernetes.io/part-of": "qwen-vl-serving",
        "qwen-vl-serving/deployment": "qwen3-vl-32b",
        "qwen-vl-serving/engine-role": "worker",
        "leaderworkerset.sigs.k8s.io/name": "qwen3-vl-32b",
        "leaderworkerset.sigs.k8s.io/group-index": "0",
        "leaderworkerset.sigs.k8s.io/worker-index": "1",
    }


def test_a_host_kind_without_known_pods_is_refused() -> None:
    """A new kind of host (say, the vision tier's) must say which pods it stands for: a host
    the firewall silently skipped would be open to everyone."""
    plan, secrets, settings = plan_of("staging")
    host = replace(plan.hosts[1], kind=cast(Any, "vision-proxy"))
    options = P.Options(run="staging", layout=LAYOUT)
    ctx = P._Context(settings, secrets, options, plan.network, [host], [])
    with pytest.raises(P.PlanError, match="gateway-0: no pods known for its kind 'vision-proxy'"):
        P.pods_on(ctx, host)
