"""The isolation stage under mocks: the namespace's NetworkPolicies are the renderer's, Redis's
included, each registered once, through the cluster's provider.

This module: the program under mocks (strict kubernetes-validate of every NetworkPolicy is in
tests/program/test_manifests.py, the vpc-cni configuration in tests/program/test_eks_cluster.py).
The other layers' tests of the same code: tests/unit/test_network_policies.py,
tests/artifacts/test_network_policies.py, tests/system/test_firewall.py.
"""

from __future__ import annotations

import pytest

from components.render.network_policies import build_network_policies
from scripts.rehearsal import plan as P
from stacks.settings import load_stack_file
from tests.support.harness import ROOT, StackRun, run_stack
from tests.support.manifests import manifest, validate

POLICY = "kubernetes:networking.k8s.io/v1:NetworkPolicy"
LWS = "kubernetes:leaderworkerset.x-k8s.io/v1:LeaderWorkerSet"


@pytest.fixture(scope="module", params=["dev", "staging", "prod"])
def run(request: pytest.FixtureRequest) -> StackRun:
    return run_stack(request.param)


def test_registered_policies_are_exactly_the_rendered_ones(run: StackRun) -> None:
    settings = load_stack_file(ROOT / f"Pulumi.{run.stack}.yaml")
    rendered = {p["metadata"]["name"]: p["spec"] for p in build_network_policies(settings)}
    registered = [manifest(r) for r in run.of_type(POLICY)]
    names = [doc["metadata"]["name"] for doc in registered]
    assert sorted(names) == sorted(rendered)  # each once
    for doc in registered:
        assert doc["spec"] == rendered[doc["metadata"]["name"]]
        assert doc["metadata"]["namespace"] == settings.serving.namespace
        validate(f"{run.stack}:{doc['metadata']['name']}", doc)


def test_the_family_lives_under_one_component_with_the_clusters_provider(run: StackRun) -> None:
    component = run.one("qwen-vl-serving:isolation:NetworkPolicies", "isolation")
    children = [r for r in run.of_type(POLICY) if r.parent == component.urn]
    # all but Redis's, which keeps its URN under the Redis component
    assert len(children) == len(run.of_type(POLICY)) - 1
    assert run.one(POLICY, "redis-ingress").parent.endswith("qwen-vl-serving:data:Redis::redis")
    assert all("pulumi:providers:kubernetes::k8s" in r.provider for r in children)


def test_the_rehearsal_firewall_gives_pods_their_registered_labels(run: StackRun) -> None:
    """The rehearsal translates the policies for pods labelled as the program registers them
    (scripts/rehearsal/plan.py): the gateway's and Redis's templates, each LWS pod's template
    plus the three labels the LWS controller adds."""
    settings = load_stack_file(ROOT / f"Pulumi.{run.stack}.yaml")
    templates = {
        doc["metadata"]["name"]: doc["spec"]["template"]["metadata"]["labels"]
        for kind in ("Deployment", "StatefulSet")
        for doc in map(manifest, run.of_type(f"kubernetes:apps/v1:{kind}"))
    }
    assert templates["gateway"] == P.gateway_pod_labels(settings)
    if settings.redis.enabled:
        assert templates["redis"] == P.redis_pod_labels()
    lws = {manifest(r)["metadata"]["name"]: manifest(r)["spec"] for r in run.of_type(LWS)}
    for d in settings.serving.deployments:
        template = lws[d.name]["leaderWorkerTemplate"]
        for rank in range(d.nodes_per_group):
            pod = template["workerTemplate"] if rank else template.get("leaderTemplate")
            registered = (pod or template["workerTemplate"])["metadata"]["labels"]
            lws_labels = {
                "leaderworkerset.sigs.k8s.io/name": d.name,
                "leaderworkerset.sigs.k8s.io/group-index": "0",
                "leaderworkerset.sigs.k8s.io/worker-index": str(rank),
            }
            expected = {**registered, **lws_labels}
            assert P.engine_pod_labels(settings, P.EnginePod(d, 0, rank)) == expected
