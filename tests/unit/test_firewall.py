"""The rehearsal's translation of NetworkPolicies into nftables (scripts/rehearsal/firewall.py).

This module: the pure translation. The other layer's test of the same code:
tests/system/test_firewall.py (the rules applied in network namespaces, real connections).
"""

from __future__ import annotations

import pytest

from components.render.network_policies import build_network_policies
from scripts.rehearsal.firewall import (
    Endpoint,
    FirewallError,
    NodeTraffic,
    port_matches,
    render_ruleset,
    selector_matches,
    translate,
)
from tests.support.engines import settings_of
from tests.support.firewall import STACK, endpoints

ADDRESSES = {
    "gateway": "10.231.0.2",
    "leader": "10.231.0.3",
    "worker": "10.231.0.4",
    "stranger": "10.231.0.5",
    "other": "10.231.0.6",
}


@pytest.fixture(scope="module")
def rules() -> dict[str, str]:
    return translate(build_network_policies(settings_of(STACK)), endpoints(ADDRESSES))


def lines(text: str, chain: str) -> list[str]:
    body = text.split(f"chain {chain} {{", 1)[1].split("\n  }", 1)[0]
    return [line.strip() for line in body.strip().splitlines()]


def test_every_host_drops_by_default_and_keeps_replies(rules: dict[str, str]) -> None:
    assert set(rules) == set(ADDRESSES.values())
    for text in rules.values():
        assert "delete table inet qvr_policy" in text
        for chain in ("ingress", "egress"):
            assert lines(text, chain)[0].endswith("policy drop;")
            assert "ct state established,related accept" in lines(text, chain)


def test_leader_admits_the_gateway_on_http_and_its_group_on_every_port(
    rules: dict[str, str],
) -> None:
    ingress = lines(rules[ADDRESSES["leader"]], "ingress")
    assert 'ip saddr 10.231.0.2 tcp dport 8000 accept comment "engine-qwen3-vl-32b-http"' in ingress
    # group 0: the leader itself and its worker, no port match; the stranger (group 1) absent
    assert (
        'ip saddr { 10.231.0.3, 10.231.0.4 } accept comment "engine-qwen3-vl-32b-group-0"'
        in ingress
    )
    assert not any("10.231.0.5" in line or "10.231.0.6" in line for line in ingress)


def test_worker_sends_to_its_group_https_and_dns_only(rules: dict[str, str]) -> None:
    egress = lines(rules[ADDRESSES["worker"]], "egress")
    assert 'ip daddr 0.0.0.0/0 tcp dport 443 accept comment "engine-qwen3-vl-32b-egress"' in egress
    assert (
        'ip daddr { 10.231.0.3, 10.231.0.4 } accept comment "engine-qwen3-vl-32b-group-0"' in egress
    )
    assert not any("dport 8000" in line for line in egress)


def test_other_pod_may_send_nothing(rules: dict[str, str]) -> None:
    egress = lines(rules[ADDRESSES["other"]], "egress")
    assert egress[3:] == []  # policy line, loopback, replies: nothing else


def test_unisolated_pod_is_open_and_shared_hosts_scope_rules_to_each_pods_ports() -> None:
    open_pod = Endpoint("free", "elsewhere", {"app": "x"}, "10.0.0.9")
    assert 'accept comment "free: not isolated"' in render_ruleset("10.0.0.9", [], [open_pod])
    a = Endpoint("a", "ns", {"app": "a"}, "10.0.0.1", ports=(6379,))
    b = Endpoint("b", "ns", {"app": "b"}, "10.0.0.1", ports=(9090,))
    c = Endpoint("c", "ns", {"app": "c"}, "10.0.0.2")
    policy = {
        "metadata": {"name": "a-from-c", "namespace": "ns"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "a"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "c"}}}]}],
        },
    }
    ingress = lines(render_ruleset("10.0.0.1", [policy], [a, b, c]), "ingress")
    assert 'tcp dport 6379 ip saddr 10.0.0.2 accept comment "a-from-c"' in ingress
    assert 'tcp dport 9090 accept comment "b: not isolated"' in ingress


def test_selectors_ports_and_refusals() -> None:
    labels = {"tier": "db", "zone": "a"}
    assert selector_matches({}, labels)
    assert selector_matches(
        {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["db"]}]}, labels
    )
    assert not selector_matches(
        {"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}, labels
    )
    assert not selector_matches({"matchExpressions": [{"key": "x", "operator": "Exists"}]}, labels)
    assert port_matches([{"protocol": "UDP", "port": 53}, {"port": 30000, "endPort": 30100}]) == [
        "udp dport 53",
        "tcp dport 30000-30100",
    ]
    assert port_matches(None) == [""]
    with pytest.raises(FirewallError, match="named port"):
        port_matches([{"port": "http"}])


def test_node_traffic_is_accepted_before_the_pods_rules() -> None:
    pod = Endpoint("p", "ns", {"app": "p"}, "10.0.0.1")
    deny = {
        "metadata": {"name": "deny", "namespace": "ns"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
    }
    node = NodeTraffic(ingress=("ip saddr 10.0.0.9 tcp dport 9100",), egress=("udp dport 123",))
    text = render_ruleset("10.0.0.1", [deny], [pod], node)
    assert lines(text, "ingress")[3:] == ['ip saddr 10.0.0.9 tcp dport 9100 accept comment "node"']
    assert lines(text, "egress")[3:] == ['udp dport 123 accept comment "node"']
