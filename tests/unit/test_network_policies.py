"""The namespace's NetworkPolicy renderer (components/render/network_policies.py).

This module: the pure renderer. The other layers' tests of the same code:
tests/program/test_network_policies.py (registration), tests/artifacts/test_network_policies.py
(reachability by network-config-analyzer), tests/system/test_firewall.py (nftables).
"""

from __future__ import annotations

import dataclasses

import pytest

from components.render.network_policies import (
    build_namespace_policies,
    build_network_policies,
    group_selector,
    leader_selector,
    max_groups,
)
from components.render.vllm_command import LEADER, WORKER
from components.render.vllm_pods import pod_labels
from tests.support.engines import settings_of, spec_of


def by_name(stack: str) -> dict[str, dict]:
    return {p["metadata"]["name"]: p for p in build_network_policies(settings_of(stack))}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_default_deny_covers_every_pod_both_ways(stack: str) -> None:
    deny = by_name(stack)["default-deny"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def test_leader_selector_matches_the_rendered_leader_and_not_the_worker() -> None:
    spec = spec_of("staging", "qwen3-vl-32b")
    selector = leader_selector("qwen3-vl-32b")
    assert selects(selector, pod_labels(spec, LEADER))
    assert not selects(selector, pod_labels(spec, WORKER))


def test_one_group_policy_per_group_index_only_for_multi_node_deployments() -> None:
    policies = by_name("staging")
    groups = sorted(n for n in policies if "-group-" in n)
    assert groups == ["engine-qwen3-vl-32b-group-0"]  # 2b is single-node: ranks share a pod
    spec = policies["engine-qwen3-vl-32b-group-0"]["spec"]
    same = {"podSelector": {"matchLabels": group_selector("qwen3-vl-32b", 0)}}
    # leader and workers of group 0, every port, both ways: from/to exactly the selected group
    assert spec["podSelector"] == same["podSelector"]
    assert spec["ingress"] == [{"from": [same]}]
    assert spec["egress"] == [{"to": [same]}]
    # the labels the LWS controller puts on every pod of a group
    # (docs/reference/eks-network-policy.md#lws-pod-labels)
    assert group_selector("qwen3-vl-32b", 0) == {
        "leaderworkerset.sigs.k8s.io/name": "qwen3-vl-32b",
        "leaderworkerset.sigs.k8s.io/group-index": "0",
    }


def test_group_policies_follow_kedas_max_replicas() -> None:
    settings = settings_of("staging")
    d = settings.serving.deployments[1]
    wide = dataclasses.replace(d, autoscaling=dataclasses.replace(d.autoscaling, max_replicas=3))
    serving = dataclasses.replace(
        settings.serving, deployments=(settings.serving.deployments[0], wide)
    )
    scaled = dataclasses.replace(settings, serving=serving)
    assert max_groups(scaled, wide) == 3
    names = [p["metadata"]["name"] for p in build_namespace_policies(scaled)]
    assert [n for n in names if "-group-" in n] == [
        f"engine-qwen3-vl-32b-group-{g}" for g in range(3)
    ]
    no_keda = dataclasses.replace(
        scaled, autoscaling=dataclasses.replace(scaled.autoscaling, keda=False)
    )
    assert max_groups(no_keda, wide) == wide.replicas


def test_engine_egress_is_https_dns_and_redis_only_with_lmcache() -> None:
    settings = settings_of("dev")
    egress = by_name("dev")["engine-qwen3-vl-2b-egress"]["spec"]["egress"]
    assert [r["ports"] for r in egress] == [
        [{"protocol": "TCP", "port": 443}],
        [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    ]
    d = dataclasses.replace(settings.serving.deployments[0], kv_offload_redis=True)
    lm = dataclasses.replace(
        settings, serving=dataclasses.replace(settings.serving, deployments=(d,))
    )
    policies = {p["metadata"]["name"]: p for p in build_network_policies(lm)}
    egress = policies["engine-qwen3-vl-2b-egress"]["spec"]["egress"]
    assert egress[-1]["ports"] == [{"protocol": "TCP", "port": 6379}]
    redis_from = policies["redis"]["spec"]["ingress"][0]["from"]
    assert redis_from[-1]["podSelector"]["matchExpressions"][0]["values"] == ["qwen3-vl-2b"]


def test_webui_ingress_follows_its_exposure() -> None:
    settings = settings_of("dev")
    ingress = by_name("dev")["webui"]["spec"]["ingress"]
    assert ingress == [
        {
            "from": [{"ipBlock": {"cidr": settings.network.cidr}}],
            "ports": [{"protocol": "TCP", "port": 8080}],
        }
    ]
    internal = dataclasses.replace(
        settings, webui=dataclasses.replace(settings.webui, exposure="internal")
    )
    spec = {p["metadata"]["name"]: p for p in build_network_policies(internal)}["webui"]["spec"]
    assert "ingress" not in spec  # isolated, with no rule
    assert "Ingress" in spec["policyTypes"]


def test_prod_has_no_webui_policy_and_no_prometheus_rules_without_monitoring() -> None:
    assert "webui" not in by_name("prod")
    settings = settings_of("dev")
    quiet = dataclasses.replace(
        settings, monitoring=dataclasses.replace(settings.monitoring, enabled=False)
    )
    text = repr(build_network_policies(quiet))
    assert "monitoring" not in text
